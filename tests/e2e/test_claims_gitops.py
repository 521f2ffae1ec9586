"""The operator never writes spec (what GitOps tools rely on): after a create, a rollout, an automatic rollback, key
rotations and a revocation, no field manager but the test's own owns a field under `spec` of the DeepSeekDeployment
or the ApiKeys, and `metadata.generation` moved exactly with the test's own spec edits."""

from __future__ import annotations

import pytest
from claims_support import assert_spec_untouched, create_apikey, get_apikey, manager_of, secret_token, spec_owners

from devcluster.testing.bluegreen import GROUP, VERSION, World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_operator_owns_no_spec_field_and_moves_no_generation(world: World) -> None:
    created = world.create()
    manager = manager_of(created)
    first = world.wait_phase("Completed", timeout=300)["activeRevision"]
    edits = 0

    # a key that rotates every 10 s, and one that is revoked
    rotating = create_apikey(world, "rotating", duration="30s", renewBefore="20s", gracePeriod="5s")
    create_apikey(world, "revoked")
    first_token = wait_for("the rotating key's token", lambda: secret_token(world, "rotating"), 60)
    wait_for("the revoked key's token", lambda: secret_token(world, "revoked"), 60)

    # a rollout
    world.patch({"spec": {"model": {"revision": "v2"}}})
    edits += 1
    second = wait_for("the v2 rollout", lambda: (r := world.status().get("rollout") or {}).get("revision")
                      not in (None, first) and r["revision"], 60)
    world.wait_phase("Completed", revision=second, timeout=300)

    # a revision that cannot start: rolled back by the operator on its own
    world.patch({"spec": {"model": {"revision": "v3", "source": {"hostPath": {"path": str(world.model)
                                                                                + "-missing"}}}}})
    edits += 1
    status = wait_for("the automatic rollback", lambda: (s := world.status()).get("failedRevision") not in (
        None, first, second) and (s.get("rollout") or {}).get("phase") == "Degraded" and s, 240)
    assert status["activeRevision"] == second

    # rotations (at least two) and a revocation
    rotated: set[str] = {first_token}

    def two_rotations() -> bool:
        token = secret_token(world, "rotating")
        if token:
            rotated.add(token)
        return len(rotated) >= 3

    wait_for("two rotations", two_rotations, 120, interval=0.5)
    world.custom.patch_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", "revoked",
                                                {"spec": {"revoked": True}})
    wait_for("the revocation", lambda: next((c for c in (get_apikey(world, "revoked").get("status") or {}).get(
        "conditions") or [] if c["type"] == "Revoked" and c["status"] == "True"), None), 60)
    assert len(world.events("Promoted")) >= 2 and world.events("RolledBack")

    deployment = world.get()
    assert "deepseek-operator" not in spec_owners(deployment)
    assert_spec_untouched(deployment, manager, 1 + edits)
    assert_spec_untouched(get_apikey(world, "rotating"), manager_of(rotating), 1)
    assert_spec_untouched(get_apikey(world, "revoked"), manager, 2)
    # status is the operator's: it wrote it, under its own field manager or kopf's
    status_writers = {entry["manager"] for entry in deployment["metadata"]["managedFields"]
                      if entry.get("subresource") == "status"}
    assert status_writers and manager not in status_writers, status_writers
