"""The CRDs deleted by hand while the operator still runs, as the README says to remove them (with crds.keep, the
default, `helm uninstall` leaves them): the API server deletes every ApiKey and DeepSeekDeployment with their CRDs;
the running operator revokes each key's tokens and lets it go, so the CRDs and the tenant's namespace go too, nothing
left `Terminating`, and the operator runs on, waiting for its CRDs again.

A cluster of its own: the test deletes the CRDs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from uninstall_support import (
    CRD_NAMES,
    OPS,
    RELEASE,
    RevocationRecorder,
    create_deployment,
    delete_namespace,
    install,
    issued_key,
    kubectl_json,
    revoked_event,
    wait_crds_gone,
    what_is_left,
)

from devcluster.cluster import ClusterConfig, DevCluster
from devcluster.testing.polling import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

TENANT = "tenant"
OPERATOR_PODS = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component!=uninstall-cleanup"


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[DevCluster]:
    with DevCluster(ClusterConfig(name=f"crds-by-hand-{os.getpid()}", nodes=1)) as cluster:
        yield cluster


def test_deleting_the_crds_while_the_operator_runs_revokes_every_key_and_leaves_nothing_terminating(own_cluster):
    cluster = own_cluster
    install(cluster, "crds.keep=true")  # the default: helm uninstall would leave the CRDs, so they go by hand
    cluster.kubectl("create", "namespace", TENANT)
    create_deployment(cluster, TENANT)
    key = issued_key(cluster, TENANT, "alice")
    token_id = key["status"]["tokenId"]
    [operator_pod] = kubectl_json(cluster, "get", "pods", "-n", OPS, "-l",
                                  OPERATOR_PODS)["items"]
    restarts = sum(c.get("restartCount", 0) for c in operator_pod["status"]["containerStatuses"])
    recorder = RevocationRecorder(cluster, TENANT)
    try:
        out = cluster.kubectl("delete", "crd", *CRD_NAMES, "--wait=false", check=False)
        assert out.returncode == 0, out.stderr
        try:
            print(f"\nCRDs gone {wait_crds_gone(cluster):.1f} s after kubectl delete")
        except AssertionError:
            raise AssertionError(what_is_left(cluster)) from None
        # revoked by the operator before the key went: in the deployment's auth ConfigMap, and said in an Event
        assert token_id in recorder.revoked, recorder.revoked
        assert wait_for("alice's Revoked Event", lambda: revoked_event(cluster, TENANT, "alice", token_id),
                        timeout=30)
    finally:
        recorder.stop()
    print(f"namespace {TENANT} gone {delete_namespace(cluster, TENANT):.1f} s after kubectl delete")
    # its signing keys went with the deployment, and the operator runs on, waiting for its CRDs
    assert not kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                            "app.kubernetes.io/component=signing-key")["items"]
    wait_for("the operator ready", lambda: kubectl_json(cluster, "get", "deployment", RELEASE, "-n", OPS)[
        "status"].get("readyReplicas") == 1, timeout=90, interval=1)
    [operator_pod] = kubectl_json(cluster, "get", "pods", "-n", OPS, "-l", OPERATOR_PODS)["items"]
    print(f"operator restarts after the CRDs went: "
          f"{sum(c.get('restartCount', 0) for c in operator_pod['status']['containerStatuses']) - restarts}")
