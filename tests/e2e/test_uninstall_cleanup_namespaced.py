"""`helm uninstall` of a release that watches only some namespaces (watchNamespaces, namespaced RBAC) installed with
crds.keep=false, on devcluster through real helm: the pre-delete hook deletes the ApiKeys and DeepSeekDeployments in
the watched namespaces while the operator still runs, so each key's tokens are revoked and the CRDs and the namespaces
go, none left `Terminating`; the hook's Job succeeds and goes, with its account and RBAC. A watched namespace deleted
before the uninstall does not stop it.

A cluster of its own: the uninstall deletes the CRDs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from kubernetes import client, watch
from uninstall_support import (
    HOOK,
    OPS,
    RELEASE,
    RevocationRecorder,
    create_deployment,
    create_key,
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

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

WATCHED = "team-a"
UNWATCHED = "team-b"
RETIRED = "team-retired"  # watched, then deleted before the uninstall


class HookJobRecorder:
    """The conditions the hook's Job reached over its life (a watch: with hook-succeeded it is deleted as soon as it
    completes, so no look afterwards would find it)."""

    def __init__(self, cluster: DevCluster) -> None:
        self.batch = client.BatchV1Api(cluster.api_client())
        self.conditions: set[str] = set()
        self.deleted = threading.Event()
        self._stop = threading.Event()
        self._version = self.batch.list_namespaced_job(OPS).metadata.resource_version
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and not self.deleted.is_set():
            for event in watch.Watch().stream(self.batch.list_namespaced_job, OPS,
                                              field_selector=f"metadata.name={HOOK}",
                                              resource_version=self._version, timeout_seconds=5):
                job = event["object"]
                self._version = job.metadata.resource_version
                self.conditions.update(c.type for c in (job.status.conditions or []) if c.status == "True")
                if event["type"] == "DELETED":
                    self.deleted.set()
                    return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def own_cluster() -> Iterator[DevCluster]:
    """A cluster for one test (each uninstalls its release, CRDs and all), with the namespaces the tests use (before
    the chart, which puts a Role in each watched one)."""
    with DevCluster(ClusterConfig(name=f"uninstall-ns-{os.getpid()}", nodes=1)) as cluster:
        for namespace in (WATCHED, UNWATCHED, RETIRED):
            cluster.kubectl("create", "namespace", namespace)
        yield cluster


def install_watching(cluster: DevCluster, *namespaces: str) -> None:
    """The chart with crds.keep=false watching `namespaces`, and a DeepSeekDeployment `chat` in WATCHED."""
    install(cluster, f"watchNamespaces={{{','.join(namespaces)}}}")
    # Namespaced mode: the operator's rights are Roles in the watched namespaces and its own, none cluster-wide.
    assert RELEASE not in cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout
    create_deployment(cluster, WATCHED)


def test_uninstall_in_namespaced_mode_revokes_every_watched_key_and_leaves_nothing_terminating(own_cluster):
    cluster = own_cluster
    install_watching(cluster, WATCHED)
    key = issued_key(cluster, WATCHED, "alice")
    token_id = key["status"]["tokenId"]
    # A key where the operator does not watch: nobody issues it or puts a finalizer on it, so the CRD's deletion
    # takes it, and the hook (which acts where the operator watches) need not.
    create_key(cluster, UNWATCHED, "stray")
    stray = kubectl_json(cluster, "get", "apikey", "stray", "-n", UNWATCHED)
    assert not stray["metadata"].get("finalizers") and not stray.get("status"), stray
    assert len(kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                            "app.kubernetes.io/component=signing-key")["items"]) == 1

    revocations, hook_job = RevocationRecorder(cluster, WATCHED), HookJobRecorder(cluster)
    try:
        out, took = uninstall(cluster)
        print(f"\nhelm uninstall: rc {out.returncode} after {took:.1f} s")
        assert out.returncode == 0, out.stderr + what_is_left(cluster)
        # The hook's Job ran to completion and then went (hook-delete-policy hook-succeeded).
        assert hook_job.deleted.wait(10), hook_job.conditions
        assert hook_job.conditions >= {"Complete"} and "Failed" not in hook_job.conditions, hook_job.conditions
        # Revoked by the operator before the key went: in the deployment's auth ConfigMap, and said in an Event.
        assert token_id in revocations.revoked, revocations.revoked
        assert revoked_event(cluster, WATCHED, "alice", token_id)
    finally:
        revocations.stop()
        hook_job.stop()

    print(f"CRDs gone {wait_crds_gone(cluster):.1f} s after helm uninstall returned")
    # The operator deleted the deployment's private signing keys as it saw the deployment go.
    assert not kubectl_json(cluster, "get", "secrets", "-n", OPS, "-l",
                            "app.kubernetes.io/component=signing-key")["items"]
    # The hook's Job, account and RBAC went with its success; the release's own objects (in its namespace and the
    # watched one) with the uninstall. (The deployment's own Role in the watched namespace goes with the deployment,
    # by the garbage collector.)
    left = cluster.kubectl("get", "job,serviceaccount,role,rolebinding", "-n", OPS, "-o", "name").stdout.split()
    assert left in ([], ["serviceaccount/default"]), left
    left = cluster.kubectl("get", "role,rolebinding", "-n", WATCHED, "-l", f"app.kubernetes.io/instance={RELEASE}",
                           "-o", "name").stdout.split()
    assert left == [], left
    assert RELEASE not in cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout
    for namespace in (WATCHED, UNWATCHED):
        print(f"namespace {namespace} gone {delete_namespace(cluster, namespace):.1f} s after kubectl delete")


def test_uninstall_in_namespaced_mode_after_a_watched_namespace_was_deleted(own_cluster):
    """A team's namespace deleted while the release still lists it: the hook has nothing to do there and must not
    stop the uninstall (with Roles of its own in each watched namespace, Helm could not create the one in the
    deleted namespace and failed the uninstall: `namespaces "team-retired" not found`)."""
    cluster = own_cluster
    install_watching(cluster, WATCHED, RETIRED)
    token_id = issued_key(cluster, WATCHED, "alice")["status"]["tokenId"]
    print(f"\nnamespace {RETIRED} gone {delete_namespace(cluster, RETIRED):.1f} s after kubectl delete")

    out, took = uninstall(cluster)
    print(f"helm uninstall: rc {out.returncode} after {took:.1f} s")
    assert out.returncode == 0, out.stderr + what_is_left(cluster)
    assert revoked_event(cluster, WATCHED, "alice", token_id)
    print(f"CRDs gone {wait_crds_gone(cluster):.1f} s after helm uninstall returned")
    assert not cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name", "-l",
                               "app.kubernetes.io/component=uninstall-cleanup").stdout.split()
    print(f"namespace {WATCHED} gone {delete_namespace(cluster, WATCHED):.1f} s after kubectl delete")
