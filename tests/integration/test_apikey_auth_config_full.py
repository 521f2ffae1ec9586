"""A full auth ConfigMap against a real API server: new keys wait with a condition that says why, while revocations
and deletions still land and the ConfigMap never passes the 1 MiB the API server accepts."""

from __future__ import annotations

import base64
import random
import time

import pytest
from deepseek_operator.auth_config import (
    CONFIGMAP_LIMIT,
    NEW_ENTRY_BUDGET,
    configmap_size,
    decode_documents,
    encode_documents,
)
from deepseek_operator.auth_config import AuthDocuments as Documents

pytestmark = pytest.mark.cluster


def _fill(world, revoked: int) -> None:
    """Another writer's revocations (say, of keys deleted earlier) that leave no room for new keys."""
    rng = random.Random(11)
    current = world.core.read_namespaced_config_map("chat-auth", world.namespace)
    docs = decode_documents(current.data, current.binary_data)
    far = int(time.time()) + 72 * 3600
    extra = {base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode(): far - rng.randrange(3600 * 24)
             for _ in range(revoked)}
    filled = Documents(config=docs.config, jwks=docs.jwks, revoked={**docs.revoked, **extra}, limits=docs.limits)
    data, binary = encode_documents(filled)
    assert NEW_ENTRY_BUDGET < configmap_size(data, binary) < CONFIGMAP_LIMIT
    current.data, current.binary_data = data, binary or None
    world.core.replace_namespaced_config_map("chat-auth", world.namespace, current)


def _size(world) -> int:
    current = world.core.read_namespaced_config_map("chat-auth", world.namespace)
    return configmap_size(current.data or {}, current.binary_data or {})


def _deployment_condition(world, type_: str) -> dict:
    return next((c for c in world.deployment().get("status", {}).get("conditions", []) if c["type"] == type_), {})


def test_new_keys_wait_when_the_auth_configmap_is_full_and_deletions_still_revoke(world):
    world.apply_deployment()
    world.create_apikey("early")
    early = world.wait_ready("early")
    roomy = world.wait_for("AuthConfigFull=False", lambda: _deployment_condition(world, "AuthConfigFull").get(
        "status") == "False" and _deployment_condition(world, "AuthConfigFull"))
    assert "KiB" in roomy["message"]

    _fill(world, 38_000)
    full = world.wait_for("AuthConfigFull=True", lambda: _deployment_condition(world, "AuthConfigFull").get(
        "status") == "True" and _deployment_condition(world, "AuthConfigFull"))
    assert full["reason"] == "NewKeysWait" and "delete unused ApiKeys" in full["message"]

    # A new key, with limits of its own, waits: no token, no Secret, no limits entry, and it says why.
    world.create_apikey("late", rateLimit={"requestsPerSecond": 1, "burst": 2})
    late = world.wait_condition("late", "Ready", "False", reason="AuthConfigFull")
    assert "KiB" in next(c for c in late["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert world.secret("late-apikey") is None
    assert late["metadata"]["uid"] not in world.auth()["limits"]

    # Deleting a key still revokes its token and releases the key: the finalizer is not stuck behind the size.
    world.delete_apikey("early")
    world.wait_for("early deleted", lambda: world.apikey("early") is None)
    assert early["status"]["tokenId"] in world.auth()["revoked"]
    assert _size(world) < CONFIGMAP_LIMIT
