"""Operator replicas with leader election as local processes, and the Lease they compete for (tests of failover).

Each replica is `python -m deepseek_operator --leader-election` with its own `POD_NAME` (so the Lease's
holderIdentity says which replica leads: `<name>_<random>`), its own log file and, optionally, a liveness port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kubernetes import client

from devcluster.testing.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
LEASE_NAME = "deepseek-operator"


class OperatorReplica:
    """One operator process taking part in leader election for `lease_namespace/lease_name`."""

    def __init__(self, name: str, kubeconfig: str, env: dict[str, str], *, lease_namespace: str,
                 lease_name: str = LEASE_NAME, liveness_port: int | None = None) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        self.env = {**env, "POD_NAME": name, "DEEPSEEK_OPERATOR_LEADER_ELECTION": "true",
                    "DEEPSEEK_OPERATOR_LEADER_ELECTION_NAMESPACE": lease_namespace,
                    "DEEPSEEK_OPERATOR_LEADER_ELECTION_LEASE_NAME": lease_name}
        self.liveness_port = liveness_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"deepseek-operator-{name}-", suffix=".log")[1])

    def start(self, failpoint: str | None = None, failpoint_sleep: float | None = None) -> None:
        """Start it; with `failpoint` (see deepseek_operator.failpoints) it SIGKILLs itself at that step, or with
        `failpoint_sleep` holds the reconcile there that many seconds."""
        assert not self.running, f"replica {self.name} already running"
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **self.env}
        env.pop("DEEPSEEK_OPERATOR_FAILPOINT", None)
        env.pop("DEEPSEEK_OPERATOR_FAILPOINT_SLEEP", None)
        if failpoint:
            env["DEEPSEEK_OPERATOR_FAILPOINT"] = failpoint
            if failpoint_sleep is not None:
                env["DEEPSEEK_OPERATOR_FAILPOINT_SLEEP"] = str(failpoint_sleep)
        liveness = f"http://127.0.0.1:{self.liveness_port}/healthz" if self.liveness_port else "none"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deepseek_operator", "--all-namespaces", "--liveness", liveness,
                 "--log-format", "plain"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def kill(self) -> None:
        """SIGKILL: no cleanup and no Lease release, as an OOM kill or a lost node."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod (a leader then releases its Lease)."""
        stop_process(self.proc, grace=30)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def holds(self, holder: str | None) -> bool:
        """Whether a Lease holderIdentity is this replica's."""
        return bool(holder) and str(holder).startswith(f"{self.name}_")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def lease_holder(api_client: client.ApiClient, namespace: str, name: str = LEASE_NAME) -> str | None:
    """The Lease's holderIdentity, or None while there is no Lease (or no holder)."""
    try:
        lease = client.CoordinationV1Api(api_client).read_namespaced_lease(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return lease.spec.holder_identity or None
