"""Token rotation end to end with short durations, across an operator restart in the middle."""

from __future__ import annotations

import time

import pytest
from conftest import GROUP, VERSION
from deepseek_operator.apikey_plan import ROTATE_ANNOTATION
from deepseek_operator.durations import parse_timestamp
from deepseek_server.auth.configmap_source import state_from_configmap
from deepseek_server.auth.tokens import TokenRejected, verify_token

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_rotation_with_grace_then_revocation_survives_an_operator_restart(world, operator):
    world.apply_deployment()
    world.create_apikey("rot", duration="30s", renewBefore="15s", gracePeriod="10s")
    first = world.wait_ready("rot")["status"]
    first_token = world.token("rot")
    renewal = parse_timestamp(first["renewalTime"])
    assert renewal == parse_timestamp(first["expiresAt"]) - 15

    # Stop the operator before the renewal is due and start a new one: the due time lives in status.
    time.sleep(max(0.0, renewal - time.time() - 9))
    operator.kill()
    time.sleep(2)
    operator.start()

    second = world.wait_for("rotation", lambda: (s := world.apikey("rot")["status"]).get("revision") == 2 and s,
                            timeout=60)
    rotated_at = time.time()
    # Due at renewalTime from status: a restarted operator that forgot it would let the old token expire first
    # (15 s later). How close to renewalTime it lands is the machine's speed, not the behaviour.
    assert rotated_at - renewal < 15, "rotation must happen at renewalTime, before the old token expires"
    assert second["tokenId"] != first["tokenId"]
    second = world.wait_ready("rot")["status"]
    second_token = world.token("rot")
    assert world.verify(second_token)["jti"] == second["tokenId"]
    # The old token keeps working during its grace period ...
    assert [p["tokenId"] for p in second["previousTokens"]] == [first["tokenId"]]
    assert first["tokenId"] not in world.auth()["revoked"]
    world.verify(first_token)
    # ... and is revoked when it ends.
    revoke_at = parse_timestamp(second["previousTokens"][0]["revokeAt"])
    assert revoke_at == pytest.approx(parse_timestamp(second["issuedAt"]) + 10, abs=1)
    world.wait_for("old token revoked", lambda: first["tokenId"] in world.auth()["revoked"], timeout=15)
    assert time.time() - revoke_at < 6
    final = world.wait_for("grace bookkeeping cleared",
                           lambda: "previousTokens" not in (s := world.apikey("rot")["status"]) and s)
    assert final["tokenId"] == second["tokenId"] and final["revision"] == 2, "restart must not issue twice"
    reasons = world.wait_events("rot", "Revoked", lambda found: "Revoked" in found)
    assert reasons.count("Issued") == 0 and reasons.count("Rotated") == 1 and reasons.count("Revoked") == 1


def server_scopes(world, token: str) -> set[str]:
    """The scopes a server grants `token`, judged by the server's own verifier on the deployment's auth ConfigMap as
    it is now (signature, claims and the revoked list); TokenRejected when it refuses it."""
    configmap = world.core.read_namespaced_config_map("chat-auth", world.namespace)
    return set(verify_token(token, state_from_configmap(configmap)).scopes)


def test_added_scopes_keep_the_old_token_for_its_grace_period_and_a_removed_scope_revokes_every_token(world,
                                                                                                       operator):
    world.apply_deployment()
    world.create_apikey("widen", scopes=["model:predict"], gracePeriod="1h")
    first = world.wait_ready("widen")["status"]
    first_token = world.token("widen")
    assert server_scopes(world, first_token) == {"model:predict"}

    # Adding a scope issues a token with it, and the old one keeps working until its workloads re-read the Secret.
    # Made while the operator is down: what the old token holds is read from status, not remembered.
    operator.stop()
    world.patch_apikey("widen", {"scopes": ["model:predict", "history:read"]})
    operator.start()
    second = world.wait_for("the wider token", lambda: (s := world.wait_ready("widen")["status"]).get("revision") == 2
                            and s, timeout=60)
    second_token = world.token("widen")
    assert world.verify(second_token)["jti"] == second["tokenId"]
    assert server_scopes(world, second_token) == {"history:read", "model:predict"}
    assert first["tokenId"] not in world.auth()["revoked"], "adding a scope revoked the old token at once"
    assert server_scopes(world, first_token) == {"model:predict"}
    assert second["tokenScopes"] == ["history:read", "model:predict"]
    assert [p["tokenId"] for p in second["previousTokens"]] == [first["tokenId"]]
    revoke_at = parse_timestamp(second["previousTokens"][0]["revokeAt"])
    assert revoke_at == pytest.approx(parse_timestamp(second["issuedAt"]) + 3600, abs=1)
    world.wait_for("a Rotated Event saying the scopes were widened", lambda: [
        e for e in world.events("widen") if e.reason == "Rotated" and "(ScopesWidened: scopes widened from "
        "model:predict to history:read, model:predict; the old token keeps working until" in (e.message or "")])

    # Removing one stops it at once with every token that held it: the current one and the one in its grace.
    world.patch_apikey("widen", {"scopes": ["history:read"]})
    world.wait_for("both earlier tokens revoked",
                   lambda: {first["tokenId"], second["tokenId"]} <= set(world.auth()["revoked"]), timeout=30)
    for token in (first_token, second_token):
        with pytest.raises(TokenRejected, match="revoked"):
            server_scopes(world, token)
    third = world.wait_for("the narrower token", lambda: (s := world.wait_ready("widen")["status"]).get("revision")
                           == 3 and s, timeout=60)
    assert "previousTokens" not in third
    assert server_scopes(world, world.token("widen")) == {"history:read"}
    world.wait_for("a Rotated Event saying which scope was removed", lambda: [
        e for e in world.events("widen") if e.reason == "Rotated" and "(BindingChanged: scopes changed from "
        "history:read, model:predict to history:read (model:predict removed); the old token is revoked)"
        in (e.message or "")])


def test_a_removed_scope_seen_with_a_deleted_secret_revokes_the_token_in_its_grace_period_too(world, operator):
    world.apply_deployment()
    world.create_apikey("lost", scopes=["model:predict", "history:read"], gracePeriod="1h")
    first = world.wait_ready("lost")["status"]
    first_token = world.token("lost")
    world.custom.patch_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", "lost",
                                                {"metadata": {"annotations": {ROTATE_ANNOTATION: "now"}}})
    second = world.wait_for("the rotation", lambda: (s := world.wait_ready("lost")["status"]).get("revision") == 2
                            and s, timeout=60)
    assert [p["tokenId"] for p in second["previousTokens"]] == [first["tokenId"]]  # in its grace period for 1h
    assert server_scopes(world, first_token) == {"history:read", "model:predict"}

    # A scope removed while the Secret is gone too (deleted to have a new token made, say): the new token is issued
    # because the Secret is missing, and every token that held the removed scope stops working all the same.
    operator.stop()
    world.patch_apikey("lost", {"scopes": ["model:predict"]})
    world.core.delete_namespaced_secret("lost-apikey", world.namespace)
    operator.start()
    third = world.wait_for("the narrower token", lambda: (s := world.wait_ready("lost")["status"]).get("revision")
                           == 3 and s, timeout=60)
    assert server_scopes(world, world.token("lost")) == {"model:predict"}
    assert {first["tokenId"], second["tokenId"]} <= set(world.auth()["revoked"]), \
        "a token holding the removed scope still works"
    with pytest.raises(TokenRejected, match="revoked"):
        server_scopes(world, first_token)
    assert "previousTokens" not in third
    world.wait_for("a Revoked Event naming the token in its grace period", lambda: [
        e for e in world.events("lost") if e.reason == "Revoked" and first["tokenId"] in (e.message or "")
        and "before the end of their grace period" in (e.message or "")])
