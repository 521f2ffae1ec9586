"""An operator started before its CRDs exist (a GitOps tool applying the operator first, or the chart installed with
`crds.enabled=false` before the CRDs): it waits for them, alive, and serves both kinds once they are installed.
kopf resolves what it watches once, when it starts; started without the CRDs it would never serve them.

A devcluster of its own: the CRDs must not exist when the operator starts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from conftest import FAST_OPERATOR_ENV, GROUP, REPO, VERSION, wait_for
from kubernetes import client, config

from devcluster import ClusterConfig, DevCluster
from devcluster.testing.crds import install_crds
from devcluster.testing.ports import free_port
from devcluster.testing.processes import stop_process


def test_an_operator_started_before_the_crds_waits_alive_and_serves_them_once_installed() -> None:
    with DevCluster(ClusterConfig(name=f"late-crds-{os.getpid()}", nodes=1, gpus_per_node=1)) as cluster:
        kubeconfig = str(cluster.kubeconfig)
        api = config.new_client_from_config(config_file=kubeconfig)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        log_path = Path(tempfile.mkstemp(prefix="deepseek-operator-", suffix=".log")[1])
        port = free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "deepseek_operator", "--all-namespaces", "--log-format", "plain",
                 "--liveness", f"http://127.0.0.1:{port}/healthz"],
                env={**os.environ, "KUBECONFIG": kubeconfig, **FAST_OPERATOR_ENV}, stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait_for("the operator to say it waits for the CRDs",
                     lambda: "waiting for the CustomResourceDefinitions" in log_path.read_text(errors="replace"),
                     timeout=60)
            text = log_path.read_text(errors="replace")
            assert "deepseekdeployments.deepseek.ai, apikeys.deepseek.ai" in text and "crds.enabled=true" in text
            probe = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert probe.status_code == 200 and probe.json() == {"waitingFor": "crds"}
            assert proc.poll() is None

            install_crds(kubeconfig)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="keys")))
            custom.create_namespaced_custom_object(GROUP, VERSION, "keys", "apikeys", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": "first"},
                "spec": {"deploymentRef": {"name": "chat"}, "subject": "first", "environment": "dev"}})

            def reconciled() -> str | None:
                key = custom.get_namespaced_custom_object(GROUP, VERSION, "keys", "apikeys", "first")
                ready = [c for c in (key.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
                return ready[0]["reason"] if ready else None

            assert wait_for("the key to be reconciled", reconciled, timeout=90) == "DeploymentNotFound"
            assert "the CustomResourceDefinitions are served: starting" in log_path.read_text(errors="replace")
            assert proc.poll() is None
        finally:
            stop_process(proc)
