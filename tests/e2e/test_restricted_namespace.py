"""The operator's pods are admitted in a namespace that enforces the Pod Security Standards `restricted` profile
(the real API server's PodSecurity admission) and serve: the model comes from a PersistentVolumeClaim, since
restricted refuses hostPath volumes."""

from __future__ import annotations

import pytest
from kubernetes import client

from devcluster.testing.bluegreen import World

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_deployment_in_a_restricted_namespace_becomes_ready(world: World) -> None:
    ns = world.namespace
    world.core.patch_namespace(ns, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
    # The admission really enforces: a root pod with no security context is refused.
    with pytest.raises(client.ApiException) as refused:
        world.core.create_namespaced_pod(ns, {"metadata": {"name": "root"}, "spec": {
            "containers": [{"name": "c", "image": "busybox"}]}})
    assert refused.value.status == 403 and "restricted" in refused.value.body
    pv = f"models-{ns}"
    world.core.create_persistent_volume({
        "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(world.model)},
                 "claimRef": {"namespace": ns, "name": "models"}}})
    try:
        world.core.create_namespaced_persistent_volume_claim(ns, {
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        world.create(model={"name": "tiny-chat", "revision": "v1", "source": {"pvc": {"claimName": "models"}}})
        status = world.wait_phase("Completed", timeout=300)
        assert status["readyReplicas"] == 1
        assert world.condition("Ready")["status"] == "True"
        pods = world.core.list_namespaced_pod(ns, label_selector="deepseek.ai/deployment=chat").items
        assert pods and all(p.spec.security_context.run_as_non_root for p in pods)
        assert all(c.security_context.read_only_root_filesystem for p in pods for c in p.spec.containers)
    finally:
        world.core.delete_persistent_volume(pv)
