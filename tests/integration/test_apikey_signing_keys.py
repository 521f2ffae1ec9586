"""Signing-key rotation: a new key is published before it signs; old tokens verify until they are gone."""

from __future__ import annotations

import time

import jwt
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROPAGATION = 4


@pytest.fixture(scope="module")
def operator_env(operator_env: dict[str, str]) -> dict[str, str]:
    return {**operator_env,
            "DEEPSEEK_OPERATOR_SIGNING_KEY_ROTATION": "8s",
            "DEEPSEEK_OPERATOR_SIGNING_KEY_PROPAGATION": f"{PROPAGATION}s",
            "DEEPSEEK_OPERATOR_SIGNING_KEY_RETIRE_MARGIN": "1s"}


def kids(world) -> list[str]:
    return [k["kid"] for k in world.auth()["jwks"]["keys"]]


def test_new_key_is_published_first_and_old_tokens_verify_until_revoked(world):
    world.apply_deployment()
    world.create_apikey("early", duration="1h", renewBefore="10m", gracePeriod="1m")
    world.wait_ready("early")
    early_token = world.token("early")
    first_kid = jwt.get_unverified_header(early_token)["kid"]
    assert kids(world) == [first_kid]

    second_kid = world.wait_for("a second key in the JWKS", lambda: (k := kids(world)) and len(k) > 1 and k[-1],
                                timeout=20)
    published = time.monotonic()
    switched = world.wait_for("deployment signing with the new key",
                              lambda: world.deployment()["status"].get("signingKeyId") == second_kid, timeout=20)
    assert switched and time.monotonic() - published >= PROPAGATION - 1.5, "signed before it was published"

    world.create_apikey("late", duration="1h", renewBefore="10m", gracePeriod="1m")
    world.wait_ready("late")
    late_kid = jwt.get_unverified_header(world.token("late"))["kid"]
    assert late_kid != first_kid and late_kid in kids(world)

    # The early token still has 1h to live: its key stays published and it still verifies.
    time.sleep(3)
    assert first_kid in kids(world)
    world.verify(early_token)

    # Once its last token is revoked the old key is dropped from the JWKS.
    world.patch_apikey("early", {"revoked": True})
    world.wait_for("old key dropped", lambda: first_kid not in kids(world), timeout=20)
    assert world.verify(world.token("late"))["sub"] == "late"
    # Keys keep rotating, yet only keys that can still matter are published.
    assert len(kids(world)) <= 3
