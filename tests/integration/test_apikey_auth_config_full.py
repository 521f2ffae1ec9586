"""Full auth ConfigMaps against a real API server: past one ConfigMap the entries move to shard ConfigMaps; once
the fullest shard is past the new-entry budget new keys wait with a condition that says why, while revocations and
deletions still land and no ConfigMap ever passes the 1 MiB the API server accepts."""

from __future__ import annotations

import base64
import random
import time

import pytest
from deepseek_operator.auth_config import (
    CONFIGMAP_LIMIT,
    INLINE_BUDGET,
    NEW_ENTRY_BUDGET,
    SHARD_COUNT,
    AuthDocuments,
    build_layout,
    configmap_size,
    decode_layout,
    index_shard_count,
    shard_of,
)
from kubernetes import client

pytestmark = pytest.mark.cluster


def _objects(world) -> list[client.V1ConfigMap]:
    """The index ConfigMap and every shard it lists."""
    index = world.core.read_namespaced_config_map("chat-auth", world.namespace)
    count = index_shard_count(index.data, index.binary_data)
    return [index, *(world.core.read_namespaced_config_map(f"chat-auth-{i}", world.namespace) for i in range(count))]


def _documents(world) -> AuthDocuments:
    """Every entry, as a server reads them (index plus shards)."""
    objects = _objects(world)
    return decode_layout((objects[0].data, objects[0].binary_data),
                         [(o.data, o.binary_data) for o in objects[1:]])


def _largest(world) -> int:
    return max(configmap_size(o.data or {}, o.binary_data or {}) for o in _objects(world))


def _put(world, name: str, owners: list, content) -> None:
    data, binary = content
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, owner_references=owners),
                              data=data, binary_data=binary or None)
    try:
        current = world.core.read_namespaced_config_map(name, world.namespace)
    except client.ApiException as exc:
        assert exc.status == 404
        world.core.create_namespaced_config_map(world.namespace, body)
        return
    body.metadata.resource_version = current.metadata.resource_version
    body.metadata.labels = current.metadata.labels
    world.core.replace_namespaced_config_map(name, world.namespace, body)


def _fill(world) -> None:
    """Another writer's revocations (say, of keys deleted earlier) that leave no room for new keys in shard 0.

    Token ids are long random strings so that a few thousand fill a shard: the space counts, not their number.
    """
    rng = random.Random(11)
    index = world.core.read_namespaced_config_map("chat-auth", world.namespace)
    docs = _documents(world)
    far = int(time.time()) + 72 * 3600
    extra: dict[str, int] = {}
    while configmap_size(*build_layout(AuthDocuments(revoked=extra), SHARD_COUNT).contents[1]) <= NEW_ENTRY_BUDGET:
        for _ in range(500):
            token_id = base64.urlsafe_b64encode(rng.randbytes(120)).rstrip(b"=").decode()
            if shard_of(token_id, SHARD_COUNT) == 0:
                extra[token_id] = far - rng.randrange(3600 * 24)
    filled = AuthDocuments(config=docs.config, jwks=docs.jwks, revoked={**docs.revoked, **extra}, limits=docs.limits)
    layout = build_layout(filled, SHARD_COUNT)
    assert NEW_ENTRY_BUDGET < layout.size < CONFIGMAP_LIMIT
    owners = index.metadata.owner_references
    # Shards first, then the index that lists them: what the operator itself does.
    for name, content in list(zip(layout.names("chat-auth"), layout.contents, strict=True))[::-1]:
        _put(world, name, owners, content)


def _deployment_condition(world, type_: str) -> dict:
    return next((c for c in world.deployment().get("status", {}).get("conditions", []) if c["type"] == type_), {})


def test_new_keys_wait_when_the_auth_shards_are_full_and_deletions_still_revoke(world):
    world.apply_deployment()
    world.create_apikey("early")
    early = world.wait_ready("early")
    roomy = world.wait_for("AuthConfigFull=False", lambda: _deployment_condition(world, "AuthConfigFull").get(
        "status") == "False" and _deployment_condition(world, "AuthConfigFull"))
    assert "KiB" in roomy["message"]
    assert len(_objects(world)) == 1, "a small deployment keeps the single-ConfigMap layout"

    _fill(world)
    full = world.wait_for("AuthConfigFull=True", lambda: _deployment_condition(world, "AuthConfigFull").get(
        "status") == "True" and _deployment_condition(world, "AuthConfigFull"))
    assert full["reason"] == "NewKeysWait" and "delete unused ApiKeys" in full["message"]

    # A new key, with limits of its own, waits: no token, no Secret, no limits entry, and it says why.
    world.create_apikey("late", rateLimit={"requestsPerSecond": 1, "burst": 2})
    late = world.wait_condition("late", "Ready", "False", reason="AuthConfigFull")
    message = next(c for c in late["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "KiB" in message and "chat-auth-0" in message, message
    assert world.secret("late-apikey") is None
    assert late["metadata"]["uid"] not in _documents(world).limits

    # Deleting a key still revokes its token and releases the key: the finalizer is not stuck behind the size.
    world.delete_apikey("early")
    world.wait_for("early deleted", lambda: world.apikey("early") is None)
    assert early["status"]["tokenId"] in _documents(world).revoked
    assert _largest(world) < CONFIGMAP_LIMIT
    assert len(_objects(world)) == SHARD_COUNT + 1


def test_a_deployment_outgrowing_one_configmap_moves_to_shards_without_losing_a_revocation(world):
    world.apply_deployment()
    world.create_apikey("first")
    first = world.wait_ready("first")
    # Another writer's revocations bring the single ConfigMap just past the point where it splits.
    rng = random.Random(5)
    index = world.core.read_namespaced_config_map("chat-auth", world.namespace)
    docs = _documents(world)
    far = int(time.time()) + 72 * 3600
    extra = {base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode(): far for _ in range(52_000)}
    grown = AuthDocuments(config=docs.config, jwks=docs.jwks, revoked={**docs.revoked, **extra}, limits=docs.limits)
    assert INLINE_BUDGET < build_layout(grown, 0).size < CONFIGMAP_LIMIT
    _put(world, "chat-auth", index.metadata.owner_references, build_layout(grown, 0).contents[0])

    # The next write (a new key) moves everything to shards; the new key is issued.
    world.create_apikey("second", rateLimit={"requestsPerSecond": 3, "burst": 4})
    second = world.wait_ready("second", timeout=120)
    assert len(_objects(world)) == SHARD_COUNT + 1
    moved = _documents(world)
    assert set(extra) <= set(moved.revoked) and second["metadata"]["uid"] in moved.limits
    world.delete_apikey("first")
    world.wait_for("first deleted", lambda: world.apikey("first") is None)
    assert first["status"]["tokenId"] in _documents(world).revoked
    assert _largest(world) < INLINE_BUDGET
