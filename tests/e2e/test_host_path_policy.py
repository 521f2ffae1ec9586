"""A hostPath model source outside the prefixes the admin allows gets no pods and a condition that says why; moved
under an allowed prefix, the same deployment rolls out (the e2e operator allows the temporary directory)."""

from __future__ import annotations

import time

import pytest

from devcluster.testing.bluegreen import World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_host_path_outside_the_allowed_prefixes_creates_no_pods(world: World) -> None:
    outside = "/var/lib/not-allowed/models"
    world.create(model={"name": "tiny-chat", "revision": "v1", "source": {"hostPath": {"path": outside}}})
    refused = wait_for("ModelSourceAllowed=False", lambda: (c := world.condition("ModelSourceAllowed")).get(
        "status") == "False" and c, 60)
    assert refused["reason"] == "HostPathNotAllowed" and outside in refused["message"]
    assert world.condition("Ready")["reason"] == "HostPathNotAllowed"
    world.wait_event("HostPathNotAllowed")
    time.sleep(5)  # a few reconciles later still nothing runs
    assert not world.apps.list_namespaced_deployment(world.namespace).items
    assert not world.core.list_namespaced_pod(world.namespace).items

    world.patch({"spec": {"model": {"source": {"hostPath": {"path": str(world.model)}}}}})
    status = world.wait_phase("Completed", timeout=240)
    assert status["readyReplicas"] == 1
    assert world.condition("ModelSourceAllowed")["status"] == "True"
