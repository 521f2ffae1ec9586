"""`helm uninstall` of a release installed with crds.keep=false, on devcluster through real helm: the chart's
pre-delete hook (rendered by the install, which talks to the cluster) deletes every ApiKey and DeepSeekDeployment
while the operator still runs, so each key's tokens are revoked and the CRDs and the tenants' namespaces go, none left
`Terminating`. With the operator not running, the uninstall fails having deleted nothing, and the hook's Job says
which keys it left as they are: deleted with no operator to finalize them, they would stay stuck, and be revoked
whenever an operator next ran even if the uninstall were given up.

A cluster of its own: the uninstall deletes the CRDs (which the session's other tests install with kubectl, and which
the chart could not take over).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
from uninstall_support import (
    CHART,
    CRD_NAMES,
    HOOK,
    OPS,
    RELEASE,
    RevocationRecorder,
    create_deployment,
    delete_namespace,
    install,
    issued_key,
    kubectl_json,
    revoked_event,
    uninstall,
    wait_crds_gone,
    what_is_left,
)

from devcluster.cluster import ClusterConfig, DevCluster
from devcluster.testing.polling import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1200)]

TENANT = "tenant"


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[DevCluster]:
    with DevCluster(ClusterConfig(name=f"uninstall-{os.getpid()}", nodes=1)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def release(own_cluster: DevCluster) -> DevCluster:
    """The chart installed with crds.keep=false, a tenant namespace with a DeepSeekDeployment in it."""
    install(own_cluster)
    own_cluster.kubectl("create", "namespace", TENANT)
    create_deployment(own_cluster, TENANT)
    return own_cluster


def test_turning_crds_off_on_a_release_that_would_delete_them_is_refused(release):
    """A release installed with crds.keep=false owns CRDs without `helm.sh/resource-policy: keep`, so an upgrade
    that stops rendering them (crds.enabled=false) would have Helm delete them, and every DeepSeekDeployment and
    ApiKey with them. The chart refuses that upgrade, saying how: crds.keep=true first, then crds.enabled=false,
    which leaves the CRDs and the objects in place. (Turned back on at the end, for the tests after this one.)"""
    cluster = release
    before = {(o["metadata"]["namespace"], o["metadata"]["name"])
              for o in kubectl_json(cluster, "get", "deepseekdeployments", "-A")["items"]}
    assert before
    out = cluster.helm("upgrade", RELEASE, str(CHART), "--namespace", OPS, "--reuse-values",
                       "--set", "crds.enabled=false", "--wait", "--timeout", "5m", check=False, timeout=400)
    assert out.returncode != 0, out.stdout
    assert "crds.enabled=false would have Helm delete the CRD" in out.stderr, out.stderr
    assert "upgrade with crds.keep=true first" in out.stderr
    for name in CRD_NAMES:
        assert not kubectl_json(cluster, "get", "crd", name)["metadata"].get("deletionTimestamp")

    for step in (("crds.keep=true",), ("crds.enabled=false",)):  # the way the message gives
        out = cluster.helm("upgrade", RELEASE, str(CHART), "--namespace", OPS, "--reuse-values",
                           *(arg for value in step for arg in ("--set", value)), "--wait", "--timeout", "5m",
                           check=False, timeout=400)
        assert out.returncode == 0, (step, out.stderr)
    manifest = cluster.helm("get", "manifest", RELEASE, "--namespace", OPS).stdout
    assert "kind: CustomResourceDefinition" not in manifest
    time.sleep(2)
    for name in CRD_NAMES:
        assert not kubectl_json(cluster, "get", "crd", name)["metadata"].get("deletionTimestamp")
    assert {(o["metadata"]["namespace"], o["metadata"]["name"])
            for o in kubectl_json(cluster, "get", "deepseekdeployments", "-A")["items"]} == before

    out = cluster.helm("upgrade", RELEASE, str(CHART), "--namespace", OPS, "--reuse-values", "--set",
                       "crds.enabled=true", "--set", "crds.keep=false", "--wait", "--timeout", "5m", check=False,
                       timeout=400)
    assert out.returncode == 0, out.stderr
    assert "kind: CustomResourceDefinition" in cluster.helm("get", "manifest", RELEASE, "--namespace", OPS).stdout


def test_uninstall_with_the_operator_stopped_fails_deleting_nothing_and_naming_the_keys(release):
    cluster = release
    # A short cleanup timeout for this test (the default, 3m, allows for many keys).
    out = cluster.helm("upgrade", RELEASE, str(CHART), "--namespace", OPS, "--reuse-values",
                       "--set", "crds.cleanupTimeout=15s", "--wait", "--timeout", "5m", check=False, timeout=400)
    assert out.returncode == 0, out.stderr
    key = issued_key(cluster, TENANT, "alice")
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
    assert f"the operator {OPS}/{RELEASE} is not running (scaled to zero) after 15s: nothing was deleted" in message
    assert f"{TENANT}/alice" in message and "deepseek.ai/finalizer" in message
    assert f"kubectl scale deployment {RELEASE} -n {OPS} --replicas=1" in message
    assert "eyJ" not in message
    # Nothing was uninstalled: the operator, its RBAC and the CRDs are there (helm marks the release `uninstalling`,
    # and a second `helm uninstall` carries on). Of the hook only its failed Job is left, for its log.
    status = json.loads(cluster.helm("status", RELEASE, "--namespace", OPS, "-o", "json").stdout)
    assert status["info"]["status"] == "uninstalling"
    assert kubectl_json(cluster, "get", "deployment", RELEASE, "-n", OPS)["spec"]["replicas"] == 0
    assert kubectl_json(cluster, "get", "clusterrole", RELEASE)["rules"]
    # The key was not touched: not marked for deletion, its token not revoked.
    alice = kubectl_json(cluster, "get", "apikey", "alice", "-n", TENANT)
    assert not alice["metadata"].get("deletionTimestamp"), alice["metadata"]
    assert kubectl_json(cluster, "get", "deepseekdeployments", "-n", TENANT)["items"]
    hook_left = cluster.kubectl("get", "job,serviceaccount,clusterrole,clusterrolebinding,role,rolebinding", "-A",
                                "-o", "name", "-l", "app.kubernetes.io/component=uninstall-cleanup").stdout.split()
    assert hook_left == [f"job.batch/{HOOK}"], hook_left

    # The operator back, and the uninstall given up: the key carries on with the same token, never revoked.
    cluster.kubectl("scale", "deployment", RELEASE, "-n", OPS, "--replicas=1")
    wait_for("the operator ready", lambda: (kubectl_json(cluster, "get", "deployment", RELEASE, "-n", OPS)
                                            .get("status", {}).get("readyReplicas") or 0) >= 1,
             timeout=120, interval=0.5)
    time.sleep(5)  # a few reconciles' time: a key marked for deletion would be finalized by now
    alice = kubectl_json(cluster, "get", "apikey", "alice", "-n", TENANT)
    assert not alice["metadata"].get("deletionTimestamp") and alice["status"]["tokenId"] == token_id
    assert not revoked_event(cluster, TENANT, "alice", token_id)


def test_uninstall_revokes_every_key_and_leaves_nothing_terminating(release):
    cluster = release
    # `helm install` rendered the hook because it talked to the cluster (crds.cleanupHookOffline is not set; a plain
    # `helm template` leaves the hook out).
    hooks = cluster.helm("get", "hooks", RELEASE, "--namespace", OPS).stdout
    assert f"name: {HOOK}" in hooks and "kind: Job" in hooks, hooks
    key = issued_key(cluster, TENANT, "bob")
    token_id = key["status"]["tokenId"]
    signing_keys = kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                                "app.kubernetes.io/component=signing-key")["items"]
    assert len(signing_keys) == 1
    recorder = RevocationRecorder(cluster, TENANT)
    try:
        out, took = uninstall(cluster)
        print(f"\nhelm uninstall: rc {out.returncode} after {took:.1f} s")
        assert out.returncode == 0, out.stderr + what_is_left(cluster)
        # Revoked by the operator before the key went: in the deployment's auth ConfigMap, and said in an Event.
        assert token_id in recorder.revoked, recorder.revoked
        assert revoked_event(cluster, TENANT, "bob", token_id)
    finally:
        recorder.stop()

    print(f"CRDs gone {wait_crds_gone(cluster):.1f} s after helm uninstall returned")
    # The operator deleted the deployment's private signing keys as it saw the deployment go.
    assert not kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                            "app.kubernetes.io/component=signing-key")["items"]
    # The hook's Job, account and RBAC went with its success; the release's own objects with the uninstall.
    left = cluster.kubectl("get", "job,serviceaccount,role,rolebinding", "-n", OPS, "-o", "name").stdout.split()
    assert left in ([], ["serviceaccount/default"]), left
    cluster_wide = cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout
    assert RELEASE not in cluster_wide

    print(f"namespace {TENANT} gone {delete_namespace(cluster, TENANT):.1f} s after kubectl delete")
