"""Token rotation end to end with short durations, across an operator restart in the middle."""

from __future__ import annotations

import time

import pytest
from deepseek_operator.durations import parse_timestamp

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
