"""The project's CRDs on a cluster for tests and benchmarks: applied with kubectl (as the chart and a user would), then
waited for until the API server accepts objects of their kinds, which comes a moment after `Established` (until then
a create is answered 503 "Resource kind ... not found. There can be a delay ...", more often on a busy machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from devcluster.cluster import KubectlError, not_served_yet, wait_established

CRDS = Path(__file__).resolve().parents[2] / "crds"
GROUP_VERSION = "deepseek.ai/v1alpha1"
KINDS = {"apikeys": "ApiKey", "deepseekdeployments": "DeepSeekDeployment"}


def _kubectl(kubeconfig: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("kubectl")), *args], input=input, capture_output=True,
                          text=True, env={**os.environ, "KUBECONFIG": kubeconfig}, timeout=60)


def install_crds(kubeconfig: str, timeout: float = 60) -> None:
    """Apply the CRDs and return once both kinds take objects; KubectlError or TimeoutError otherwise."""
    done = _kubectl(kubeconfig, "apply", "-f", str(CRDS))
    if done.returncode:
        raise KubectlError(done.returncode, done.args, done.stdout, done.stderr)
    wait_established(lambda *args: _kubectl(kubeconfig, *args), [f"{plural}.deepseek.ai" for plural in KINDS],
                     timeout)
    deadline = time.monotonic() + timeout
    for kind in KINDS.values():
        # a server-side dry run of an empty object: the schema refuses it once the kind is served, nothing is stored
        probe = f"apiVersion: {GROUP_VERSION}\nkind: {kind}\nmetadata: {{name: served-check, namespace: default}}\n"
        while True:
            done = _kubectl(kubeconfig, "create", "--dry-run=server", "-f", "-", input=probe)
            if not not_served_yet(done.stderr):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} not served {timeout:.0f}s after its CRD was Established: "
                                   f"{done.stderr.strip()}")
            time.sleep(0.2)
