"""A signing-key rotation does not wake the keys that hold a token: every token issued so far still verifies, so with
ten thousand keys a rotation must not mean ten thousand reconciles. Counted by the operator itself (its probes)."""

from __future__ import annotations

import jwt
import pytest
from conftest import OperatorProcess, wait_for
from test_apikey_burst import QUIET_ENV, ProbedOperator, settled

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KEYS = 3


@pytest.fixture(scope="module")
def operator_class() -> type[OperatorProcess]:
    return ProbedOperator


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    # A new signing key every few seconds; old ones stay published (their tokens live an hour, retire margin 1h).
    return {**QUIET_ENV, "DEEPSEEK_OPERATOR_SIGNING_KEY_ROTATION": "5s",
            "DEEPSEEK_OPERATOR_SIGNING_KEY_PROPAGATION": "2s", "DEEPSEEK_OPERATOR_SIGNING_KEY_RETIRE_MARGIN": "1h"}


def kids(world) -> list[str]:
    return [key["kid"] for key in world.auth()["jwks"]["keys"]]


def test_a_rotation_leaves_keys_that_hold_a_token_alone(world, operator):
    world.apply_deployment()
    for index in range(KEYS):
        world.create_apikey(f"held-{index}", duration="1h", renewBefore="10m", gracePeriod="1m")
    for index in range(KEYS):
        world.wait_ready(f"held-{index}", 60)
    tokens = {f"held-{index}": world.token(f"held-{index}") for index in range(KEYS)}
    first_kid = jwt.get_unverified_header(tokens["held-0"])["kid"]
    before, _ = settled(world, operator)
    published = len(kids(world))

    wait_for("two more signing keys published", lambda: len(kids(world)) >= published + 2, 60)
    after, _ = operator.counters()
    assert {kind: n for kind, n in (after - before).items() if kind.startswith("ApiKey")} == {}, after - before
    for name, token in tokens.items():  # untouched, and still good
        assert world.token(name) == token
        assert world.verify(token)["sub"] == name

    # A key made now is signed by one of the new signing keys.
    world.create_apikey("late", duration="1h", renewBefore="10m", gracePeriod="1m")
    world.wait_ready("late", 60)
    late_kid = jwt.get_unverified_header(world.token("late"))["kid"]
    assert late_kid != first_kid and late_kid in kids(world)
