"""A reconcile started from a watch event's object that is already out of date (the operator's own status write came
after it) must not revoke anything from that old view: revocations go to the auth ConfigMap, a write that the
ApiKey's resourceVersion does not guard, so a plan made from a stale status could revoke the very token the key's
status and Secret now hold, and leave the key Ready with a token every server refuses.

The reconciles run in this process against the real API server (no operator process), so the test decides which
object each one starts from.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
from conftest import GROUP, VERSION, Cluster, wait_for

pytestmark = pytest.mark.cluster


def _ready_deployment(runtime, world: Cluster) -> None:
    world.apply_deployment()
    wait_for("the deployment's signing key to sign", lambda: (
        runtime.deployments.reconcile(world.namespace, "chat") and False) or _can_sign(runtime, world), timeout=60)


def _can_sign(runtime, world: Cluster) -> bool:
    found = runtime.issuers.view_for(world.namespace, "chat", "probe")
    return bool(found and found[0].signing_key is not None)


@pytest.mark.parametrize("change", [{"subject": "mallory"}, {"scopes": ["history:read"]}])
def test_a_stale_event_after_a_rotation_revokes_nothing_and_the_current_token_keeps_working(
        runtime, api_client, namespace, change) -> None:
    world = Cluster(api_client, namespace)
    _ready_deployment(runtime, world)
    world.create_apikey("alice", scopes=["model:predict", "history:read"])
    runtime.apikeys.reconcile(namespace, "alice")
    first = world.apikey("alice")["status"]["tokenId"]

    world.patch_apikey("alice", change)
    event_object = copy.deepcopy(world.apikey("alice"))  # what the watch delivers for the edit
    # The event's reconcile was overtaken: another one (a restart's, the timer's) handled the edit first.
    runtime.apikeys.reconcile(namespace, "alice")
    rotated = world.apikey("alice")["status"]
    assert rotated["tokenId"] != first and rotated["observedGeneration"] == 2
    assert first in world.auth()["revoked"]

    # Now the event's reconcile runs, from the object as it was before that status write.
    runtime.apikeys.reconcile(namespace, "alice", copy.deepcopy(event_object))

    status = world.apikey("alice")["status"]
    token = world.token("alice")
    revoked = world.auth()["revoked"]
    assert status["tokenId"] == rotated["tokenId"]
    assert hashlib.sha256(token.encode()).hexdigest() == status["tokenSHA256"]
    assert status["tokenId"] not in revoked, "the key's current token, in its Secret, was revoked"
    assert world.verify(token)["jti"] == status["tokenId"]
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"


def test_a_current_token_found_revoked_is_replaced(runtime, api_client, namespace) -> None:
    """However a key's current token came to be revoked (an operator of an older version, a hand edit of the
    ConfigMap), the key gets a token that works instead of staying Ready with one every server refuses."""
    from deepseek_operator.auth_config import RevokeTokens
    from deepseek_operator.durations import parse_timestamp

    world = Cluster(api_client, namespace)
    _ready_deployment(runtime, world)
    world.create_apikey("bob")
    runtime.apikeys.reconcile(namespace, "bob")
    status = world.apikey("bob")["status"]
    dsd = world.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", "chat")
    runtime.auth_store.commit(namespace, "chat", [RevokeTokens({status["tokenId"]: int(parse_timestamp(
        status["expiresAt"]))})], owner=dsd)

    runtime.apikeys.reconcile(namespace, "bob")

    replaced = world.apikey("bob")["status"]
    assert replaced["tokenId"] != status["tokenId"]
    assert world.verify(world.token("bob"))["jti"] == replaced["tokenId"]
    assert replaced["tokenId"] not in world.auth()["revoked"]
    reasons = [e.reason for e in world.events("bob")]
    assert "Rotated" in reasons
    rotated = next(e for e in world.events("bob") if e.reason == "Rotated")
    assert "TokenRevoked" in rotated.message and status["tokenId"] in rotated.message
    assert rotated.type == "Warning"  # not a routine rotation: someone or something revoked the key's token
