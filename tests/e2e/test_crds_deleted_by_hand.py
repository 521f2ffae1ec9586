"""The CRDs deleted by hand while the operator still runs, as the README says to remove them (with crds.keep, the
default, `helm uninstall` leaves them): the API server deletes every ApiKey and DeepSeekDeployment with their CRDs;
the running operator revokes each key's tokens and lets it go, so the CRDs and the tenant's namespace go too, nothing
left `Terminating`, and the operator runs on in the same process, waiting for its CRDs again, and reconciles as soon
as they are back. With the DeepSeekDeployment CRD alone gone, a key deleted meanwhile is still let go.

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
from devcluster.testing.bluegreen import REPO
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
        # revoked by the operator before the key went, as its Event says; in the deployment's auth ConfigMap, unless
        # the deployment (deleted with its CRD at the same moment) was gone first: its servers and signing keys go
        # with it, and there is no revoked list to write (the Event says that instead)
        message = wait_for("alice's Revoked Event", lambda: revoked_event(cluster, TENANT, "alice", token_id),
                           timeout=30)
        print(f"Revoked: {message}")
        if "DeepSeekDeployment chat, which is gone" not in message:
            try:  # the recorder's watch may still be on its way to that version of the ConfigMap
                wait_for("alice's token revoked in chat-auth", lambda: token_id in recorder.revoked, timeout=30)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{operator_log(cluster, operator_pod)[-4000:]}") from None
    finally:
        recorder.stop()
    print(f"namespace {TENANT} gone {delete_namespace(cluster, TENANT):.1f} s after kubectl delete")
    # its signing keys went with the deployment (seen going, or swept while the operator waits for its CRDs)
    wait_for("no signing keys left", lambda: not signing_keys(cluster), timeout=30)
    # ... in the same process: the CRDs back, a new key is issued, and the container never restarted (kopf's next
    # watch request failed with a 404 and its process ended, or hung until its liveness probe failed)
    out = cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"), check=False)
    assert out.returncode == 0, out.stderr
    cluster.kubectl("create", "namespace", "tenant-again")
    create_deployment(cluster, "tenant-again")
    issued_key(cluster, "tenant-again", "bob")
    [operator_pod] = kubectl_json(cluster, "get", "pods", "-n", OPS, "-l", OPERATOR_PODS)["items"]
    [status] = operator_pod["status"]["containerStatuses"]
    log = operator_log(cluster, operator_pod)
    assert status.get("restartCount", 0) == restarts, f"{status.get('lastState')}\n{log[-4000:]}"
    assert "are no longer served" in log, log[-3000:]

    # The DeepSeekDeployment CRD alone goes first (every deployment with it): the operator stops and waits for it, and
    # a key deleted meanwhile is still let go (its finalizer would otherwise wait for an operator that waits for the
    # CRD), its Secret deleted and its Event saying why there was no revoked list to write.
    out = cluster.kubectl("delete", "crd", "deepseekdeployments.deepseek.ai", check=False)
    assert out.returncode == 0, out.stderr
    wait_for("the operator waiting for its CRDs", lambda: "waiting for the CustomResourceDefinitions "
             "deepseekdeployments.deepseek.ai to be served" in operator_log(cluster, operator_pod), timeout=60)
    bob = kubectl_json(cluster, "get", "apikey", "bob", "-n", "tenant-again")
    cluster.kubectl("delete", "apikey", "bob", "-n", "tenant-again", "--wait=false")
    try:
        wait_for("ApiKey bob let go", lambda: cluster.kubectl("get", "apikey", "bob", "-n", "tenant-again",
                                                              check=False).returncode != 0, timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{what_is_left(cluster)}\n{operator_log(cluster, operator_pod)[-3000:]}") from None
    message = revoked_event(cluster, "tenant-again", "bob", bob["status"]["tokenId"])
    assert message and "DeepSeekDeployment chat, which is gone" in message, message
    assert cluster.kubectl("get", "secret", "bob-apikey", "-n", "tenant-again", check=False).returncode != 0
    wait_for("no signing keys left", lambda: not signing_keys(cluster), timeout=30)
    out = cluster.kubectl("delete", "crd", "apikeys.deepseek.ai", "--timeout=60s", check=False)
    assert out.returncode == 0, out.stderr + what_is_left(cluster)


def signing_keys(cluster: DevCluster) -> list[str]:
    return [item["metadata"]["name"] for item in kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                                                               "app.kubernetes.io/component=signing-key")["items"]]


def operator_log(cluster: DevCluster, pod: dict) -> str:
    """The operator container's output so far (devcluster keeps each run of a container in its pod's folder)."""
    meta = pod["metadata"]
    logs = cluster.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" / "logs" / "operator"
    return "".join(path.read_text(errors="replace") for path in sorted(logs.glob("*.log"), key=lambda p: int(p.stem)))
