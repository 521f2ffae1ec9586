"""What the `helm uninstall` tests of the chart's pre-delete cleanup hook share (test_uninstall_cleanup*.py): an ApiKey
issued, the revocations its deployment published, what is left when the uninstall fails."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from typing import Any

from kubernetes import client, watch

from devcluster.cluster import DevCluster
from devcluster.testing.bluegreen import REPO
from devcluster.testing.polling import wait_for

RELEASE = "deepseek-operator"
OPS = "deepseek-system"
CHART = REPO / "charts" / "deepseek-operator"
HOOK = f"{RELEASE}-uninstall-cleanup"
CRD_NAMES = ("apikeys.deepseek.ai", "deepseekdeployments.deepseek.ai")
# How long the tests give the CRDs and the tenant namespace to be gone once `helm uninstall` has returned: with the
# keys finalized by the hook this takes seconds; stuck on a finalizer they never go.
GONE_WITHIN = 60.0
# The chart's values every install here sets: our image as devcluster runs it, and one operator process (the 2-core
# test machine runs others' tests too).
INSTALL_SETS = ("image.repository=local/deepseek-operator", "image.tag=dev", "operator.logFormat=plain",
                "crds.keep=false", "replicaCount=1", "leaderElection.enabled=false")


def install(cluster: DevCluster, *sets: str) -> None:
    """`helm install` of the chart in OPS with INSTALL_SETS and `sets`, waited for."""
    started = time.monotonic()
    flags = [arg for value in (*INSTALL_SETS, *sets) for arg in ("--set", value)]
    out = cluster.helm("install", RELEASE, str(CHART), "--namespace", OPS, "--create-namespace", *flags,
                       "--wait", "--timeout", "5m", check=False, timeout=400)
    assert out.returncode == 0, out.stderr
    print(f"\nhelm install: {time.monotonic() - started:.1f} s")


def uninstall(cluster: DevCluster) -> tuple[Any, float]:
    started = time.monotonic()
    out = cluster.helm("uninstall", RELEASE, "--namespace", OPS, "--wait", "--timeout", "5m", check=False,
                       timeout=400)
    return out, time.monotonic() - started


def kubectl_json(cluster: DevCluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def create_deployment(cluster: DevCluster, namespace: str) -> None:
    """A DeepSeekDeployment `chat` with no replicas: its issuer is all the keys need."""
    cluster.apply(json.dumps({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
        "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "example.com/stand-in:1",
                 "replicas": 0}}), namespace=namespace)


def create_key(cluster: DevCluster, namespace: str, name: str) -> None:
    cluster.apply(json.dumps({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey", "metadata": {"name": name},
        "spec": {"deploymentRef": {"name": "chat"}, "subject": name, "environment": "dev"}}), namespace=namespace)


def issued_key(cluster: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    """Create an ApiKey for `chat` and return it once its token is issued."""
    create_key(cluster, namespace, name)

    def issued() -> dict[str, Any] | None:
        key = kubectl_json(cluster, "get", "apikey", name, "-n", namespace)
        return key if (key.get("status") or {}).get("tokenId") else None

    key = wait_for(f"ApiKey {namespace}/{name} issued", issued, timeout=120, interval=0.5)
    assert "deepseek.ai/finalizer" in key["metadata"]["finalizers"]
    return key


def revoked_event(cluster: DevCluster, namespace: str, key: str, token_id: str) -> str | None:
    """The message of the operator's Revoked Event on `key` that names `token_id`, if there is one."""
    events = kubectl_json(cluster, "get", "events", "-n", namespace, "--field-selector",
                          f"involvedObject.name={key}")["items"]
    return next((e["message"] for e in events if e["reason"] == "Revoked" and token_id in e["message"]), None)


class RevocationRecorder:
    """Every token id the `chat-auth` ConfigMap of `namespace` lists as revoked, over its whole life (a watch, so a
    version that lived a moment before the ConfigMap went with its deployment is seen too)."""

    def __init__(self, cluster: DevCluster, namespace: str) -> None:
        self.core = client.CoreV1Api(cluster.api_client())
        self.namespace = namespace
        self.revoked: set[str] = set()
        self.deleted = threading.Event()
        self._stop = threading.Event()
        listed = self.core.list_namespaced_config_map(namespace, field_selector="metadata.name=chat-auth")
        self._record(listed.items)
        self._version = listed.metadata.resource_version
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _record(self, configmaps: list[client.V1ConfigMap]) -> None:
        for configmap in configmaps:  # `revoked`: {"<jti>": <exp>} (docs/auth-contract.md), plain or gzipped
            if "revoked.json" in (configmap.data or {}):
                self.revoked.update(json.loads(configmap.data["revoked.json"]))
            elif "revoked.json.gz" in (configmap.binary_data or {}):
                self.revoked.update(json.loads(gzip.decompress(base64.b64decode(
                    configmap.binary_data["revoked.json.gz"]))))

    def _watch(self) -> None:
        while not self._stop.is_set() and not self.deleted.is_set():
            for event in watch.Watch().stream(self.core.list_namespaced_config_map, self.namespace,
                                              field_selector="metadata.name=chat-auth",
                                              resource_version=self._version, timeout_seconds=5):
                self._version = event["object"].metadata.resource_version
                self._record([event["object"]])
                if event["type"] == "DELETED":
                    self.deleted.set()
                    return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def what_is_left(cluster: DevCluster) -> str:
    """The ApiKeys and CRDs still there, with their deletion marks and finalizers (for a failure's message)."""
    columns = "custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,DELETING:.metadata.deletionTimestamp," \
              "FINALIZERS:.metadata.finalizers"
    keys = cluster.kubectl("get", "apikeys", "-A", "-o", columns, check=False)
    crds = cluster.kubectl("get", "crd", *CRD_NAMES, "-o", columns, check=False)
    return f"\nApiKeys:\n{keys.stdout}{keys.stderr}CRDs:\n{crds.stdout}{crds.stderr}"


def wait_crds_gone(cluster: DevCluster) -> float:
    """Wait until the CRDs are gone and the API server no longer serves ApiKeys; the seconds it took."""
    started = time.monotonic()

    def crds_left() -> list[str]:
        names = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
        return [n for n in names if n.rpartition("/")[2] in CRD_NAMES]

    wait_for("the CRDs gone", lambda: not crds_left(), timeout=GONE_WITHIN, interval=0.5)
    gone = cluster.kubectl("get", "apikeys", "-A", check=False)
    # (kubectl's discovery cache may still list the kind: then the API server answers NotFound)
    assert gone.returncode != 0 and ("doesn't have a resource type" in gone.stderr or "NotFound" in gone.stderr), \
        gone.stdout + gone.stderr
    return time.monotonic() - started


def delete_namespace(cluster: DevCluster, namespace: str) -> float:
    """`kubectl delete namespace` and wait until it is gone (none of its keys left stuck); the seconds it took."""
    started = time.monotonic()
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    wait_for(f"the namespace {namespace} gone",
             lambda: cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0,
             timeout=GONE_WITHIN, interval=0.5)
    return time.monotonic() - started
