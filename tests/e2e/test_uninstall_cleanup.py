"""`helm uninstall` of a release installed with crds.keep=false, on devcluster through real helm: the chart's
pre-delete hook deletes every ApiKey and DeepSeekDeployment while the operator still runs, so each key's tokens are
revoked and the CRDs and the tenants' namespaces go, none left `Terminating`. With the operator not running, the
uninstall fails and the hook's Job says which keys are left, instead of leaving them and their namespace stuck.

A cluster of its own: the uninstall deletes the CRDs (which the session's other tests install with kubectl, and which
the chart could not take over).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch

from devcluster.cluster import ClusterConfig, DevCluster
from devcluster.testing.bluegreen import REPO
from devcluster.testing.polling import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1200)]

RELEASE = "deepseek-operator"
OPS = "deepseek-system"
TENANT = "tenant"
CHART = REPO / "charts" / "deepseek-operator"
HOOK = f"{RELEASE}-uninstall-cleanup"
CRD_NAMES = ("apikeys.deepseek.ai", "deepseekdeployments.deepseek.ai")
# How long the tests give the CRDs and the tenant namespace to be gone once `helm uninstall` has returned: with the
# keys finalized by the hook this takes seconds; stuck on a finalizer they never go.
GONE_WITHIN = 60.0


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[DevCluster]:
    with DevCluster(ClusterConfig(name=f"uninstall-{os.getpid()}", nodes=1)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def release(own_cluster: DevCluster) -> DevCluster:
    """The chart installed with crds.keep=false, a tenant namespace with a DeepSeekDeployment in it (no replicas: its
    issuer is all the keys need)."""
    cluster = own_cluster
    started = time.monotonic()
    out = cluster.helm("install", RELEASE, str(CHART), "--namespace", OPS, "--create-namespace",
                       "--set", "image.repository=local/deepseek-operator", "--set", "image.tag=dev",
                       "--set", "operator.logFormat=plain", "--set", "crds.keep=false",
                       # one operator process is enough here (the 2-core test machine runs others' tests too)
                       "--set", "replicaCount=1", "--set", "leaderElection.enabled=false",
                       "--wait", "--timeout", "5m", check=False, timeout=400)
    assert out.returncode == 0, out.stderr
    print(f"\nhelm install: {time.monotonic() - started:.1f} s")
    cluster.kubectl("create", "namespace", TENANT)
    cluster.apply(json.dumps({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
        "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "example.com/stand-in:1",
                 "replicas": 0}}), namespace=TENANT)
    return cluster


def kubectl_json(cluster: DevCluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def issued_key(cluster: DevCluster, name: str) -> dict[str, Any]:
    """Create an ApiKey for `chat` and return it once its token is issued."""
    cluster.apply(json.dumps({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey", "metadata": {"name": name},
        "spec": {"deploymentRef": {"name": "chat"}, "subject": name, "environment": "dev"}}), namespace=TENANT)

    def issued() -> dict[str, Any] | None:
        key = kubectl_json(cluster, "get", "apikey", name, "-n", TENANT)
        return key if (key.get("status") or {}).get("tokenId") else None

    key = wait_for(f"ApiKey {name} issued", issued, timeout=120, interval=0.5)
    assert "deepseek.ai/finalizer" in key["metadata"]["finalizers"]
    return key


def revoked_event(cluster: DevCluster, key: str, token_id: str) -> str | None:
    """The message of the operator's Revoked Event on `key` that names `token_id`, if there is one."""
    events = kubectl_json(cluster, "get", "events", "-n", TENANT, "--field-selector",
                          f"involvedObject.name={key}")["items"]
    return next((e["message"] for e in events if e["reason"] == "Revoked" and token_id in e["message"]), None)


class RevocationRecorder:
    """Every token id the `chat-auth` ConfigMap lists as revoked, over its whole life (a watch, so a version that
    lived a moment before the ConfigMap went with its deployment is seen too)."""

    def __init__(self, cluster: DevCluster) -> None:
        self.core = client.CoreV1Api(cluster.api_client())
        self.revoked: set[str] = set()
        self.deleted = threading.Event()
        self._stop = threading.Event()
        listed = self.core.list_namespaced_config_map(TENANT, field_selector="metadata.name=chat-auth")
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
            for event in watch.Watch().stream(self.core.list_namespaced_config_map, TENANT,
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


def uninstall(cluster: DevCluster) -> tuple[Any, float]:
    started = time.monotonic()
    out = cluster.helm("uninstall", RELEASE, "--namespace", OPS, "--wait", "--timeout", "5m", check=False,
                       timeout=400)
    return out, time.monotonic() - started


def test_uninstall_with_the_operator_stopped_fails_naming_the_keys_left(release):
    cluster = release
    # A short cleanup timeout for this test (the default, 3m, allows for many keys).
    out = cluster.helm("upgrade", RELEASE, str(CHART), "--namespace", OPS, "--reuse-values",
                       "--set", "crds.cleanupTimeout=15s", "--wait", "--timeout", "5m", check=False, timeout=400)
    assert out.returncode == 0, out.stderr
    key = issued_key(cluster, "alice")
    token_id = key["status"]["tokenId"]
    cluster.kubectl("scale", "deployment", RELEASE, "-n", OPS, "--replicas=0")
    wait_for("the operator pod gone", lambda: not kubectl_json(cluster, "get", "pods", "-n", OPS)["items"],
             timeout=60, interval=0.5)

    out, took = uninstall(cluster)
    print(f"\nhelm uninstall, operator stopped: rc {out.returncode} after {took:.1f} s: {out.stderr.strip()}")
    assert out.returncode != 0 and f"job {HOOK} failed" in out.stderr, out.stderr
    # The failed Job stays, and its pod's termination message (its log's last line) says what is left and why.
    [pod] = kubectl_json(cluster, "get", "pods", "-n", OPS, "-l", f"job-name={HOOK}")["items"]
    message = pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    print(f"the hook's termination message: {message}")
    assert f"{TENANT}/alice" in message and "deepseek.ai/finalizer" in message and "15s" in message
    assert f"{OPS}/{RELEASE}" in message  # where to look: the operator
    assert "eyJ" not in message
    # Nothing was uninstalled: the operator, its RBAC and the CRDs are there (helm marks the release `uninstalling`,
    # and a second `helm uninstall` carries on). Of the hook only its failed Job is left, for its log.
    status = json.loads(cluster.helm("status", RELEASE, "--namespace", OPS, "-o", "json").stdout)
    assert status["info"]["status"] == "uninstalling"
    assert kubectl_json(cluster, "get", "deployment", RELEASE, "-n", OPS)["spec"]["replicas"] == 0
    assert kubectl_json(cluster, "get", "clusterrole", RELEASE)["rules"]
    assert kubectl_json(cluster, "get", "apikey", "alice", "-n", TENANT)["metadata"]["deletionTimestamp"]
    hook_left = cluster.kubectl("get", "job,serviceaccount,clusterrole,clusterrolebinding", "-A", "-o", "name",
                                "-l", "app.kubernetes.io/component=uninstall-cleanup").stdout.split()
    assert hook_left == [f"job.batch/{HOOK}"], hook_left

    # The operator back: it revokes the key's token and lets it go.
    cluster.kubectl("scale", "deployment", RELEASE, "-n", OPS, "--replicas=1")
    wait_for("alice finalized", lambda: not kubectl_json(cluster, "get", "apikeys", "-n", TENANT)["items"],
             timeout=120, interval=0.5)
    assert wait_for("alice's Revoked Event", lambda: revoked_event(cluster, "alice", token_id), timeout=30)


def test_uninstall_revokes_every_key_and_leaves_nothing_terminating(release):
    cluster = release
    key = issued_key(cluster, "bob")
    token_id = key["status"]["tokenId"]
    signing_keys = kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                                "app.kubernetes.io/component=signing-key")["items"]
    assert len(signing_keys) == 1
    recorder = RevocationRecorder(cluster)
    try:
        out, took = uninstall(cluster)
        print(f"\nhelm uninstall: rc {out.returncode} after {took:.1f} s")
        assert out.returncode == 0, out.stderr + what_is_left(cluster)
        # Revoked by the operator before the key went: in the deployment's auth ConfigMap, and said in an Event.
        assert token_id in recorder.revoked, recorder.revoked
        assert revoked_event(cluster, "bob", token_id)
    finally:
        recorder.stop()

    started = time.monotonic()

    def crds_left() -> list[str]:
        names = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
        return [n for n in names if n.rpartition("/")[2] in CRD_NAMES]

    wait_for("the CRDs gone", lambda: not crds_left(), timeout=GONE_WITHIN, interval=0.5)
    gone = cluster.kubectl("get", "apikeys", "-A", check=False)
    # (kubectl's discovery cache may still list the kind: then the API server answers NotFound)
    assert gone.returncode != 0 and ("doesn't have a resource type" in gone.stderr or "NotFound" in gone.stderr), \
        gone.stdout + gone.stderr
    print(f"CRDs gone {time.monotonic() - started:.1f} s after helm uninstall returned")
    # The operator deleted the deployment's private signing keys as it saw the deployment go.
    assert not kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                            "app.kubernetes.io/component=signing-key")["items"]
    # The hook's Job, account and RBAC went with its success; the release's own objects with the uninstall.
    left = cluster.kubectl("get", "job,serviceaccount,role,rolebinding", "-n", OPS, "-o", "name").stdout.split()
    assert left in ([], ["serviceaccount/default"]), left
    cluster_wide = cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout
    assert RELEASE not in cluster_wide

    started = time.monotonic()
    cluster.kubectl("delete", "namespace", TENANT, "--wait=false")
    wait_for("the tenant namespace gone",
             lambda: cluster.kubectl("get", "namespace", TENANT, check=False).returncode != 0,
             timeout=GONE_WITHIN, interval=0.5)
    print(f"namespace {TENANT} gone {time.monotonic() - started:.1f} s after kubectl delete")
