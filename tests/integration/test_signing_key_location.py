"""Private signing keys live only in the operator's own namespace: tenants get public keys, deleting a deployment
deletes its keys, orphans are swept, and keys of the old layout (a `<deployment>-signing-key` Secret in the tenant's
namespace) move there without invalidating a token already issued."""

from __future__ import annotations

import base64
import json
import os
import uuid

import jwt
import pytest
from deepseek_operator.names import signing_key_labels
from deepseek_operator.signing_keys import (
    KEY_RING_DATA_KEY,
    KeyRing,
    parse_key_ring,
    serialize_key_ring,
    signing_key_from_seed,
)
from kubernetes import client

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def ring_of(secret: client.V1Secret) -> KeyRing:
    return parse_key_ring(base64.b64decode(secret.data[KEY_RING_DATA_KEY]).decode())


def published_kids(world, deployment: str = "chat") -> set[str]:
    return {key["kid"] for key in world.auth(deployment)["jwks"]["keys"]}


def test_tenant_namespace_holds_no_private_key_after_issuance(world):
    world.apply_deployment()
    world.create_apikey("alice")
    world.wait_ready("alice")
    token = world.token("alice")
    assert world.verify(token)["sub"] == "alice"  # with the published public keys, as servers verify

    secret = world.wait_for("signing keys in the key namespace", world.signing_key_secret)
    dsd = world.deployment()
    assert secret.metadata.labels == signing_key_labels(world.namespace, "chat", dsd["metadata"]["uid"])
    assert not secret.metadata.owner_references  # cannot reach across namespaces; labels point back instead
    ring = ring_of(secret)
    assert jwt.get_unverified_header(token)["kid"] in ring.kids() and ring.kids() == published_kids(world)

    # Nothing a tenant can read holds a private key: no Secret or ConfigMap carries a seed or a key ring.
    seeds = [key.seed for key in ring.keys]
    assert world.secret("chat-signing-key") is None
    for item in world.core.list_namespaced_secret(world.namespace).items:
        text = json.dumps({k: base64.b64decode(v).decode(errors="replace") for k, v in (item.data or {}).items()})
        assert KEY_RING_DATA_KEY not in (item.data or {}) and not any(seed in text for seed in seeds), \
            item.metadata.name
    for item in world.core.list_namespaced_config_map(world.namespace).items:
        text = json.dumps(item.data or {}) + json.dumps(item.binary_data or {})
        assert not any(seed in text for seed in seeds), item.metadata.name


def test_deleting_the_deployment_deletes_its_signing_keys(world):
    world.apply_deployment("short")
    world.wait_for("signing keys of short", lambda: world.signing_key_secret("short"))
    dsd = world.deployment("short")
    name = world.signing_key_secret("short").metadata.name
    world.custom.delete_namespaced_custom_object("deepseek.ai", "v1alpha1", world.namespace, "deepseekdeployments",
                                                 "short")

    def gone() -> bool:
        try:
            world.core.read_namespaced_secret(name, world.key_namespace)
        except client.ApiException as exc:
            return exc.status == 404
        return False
    world.wait_for(f"Secret {world.key_namespace}/{name} of deleted deployment {dsd['metadata']['uid']} deleted", gone,
                   timeout=60)


def test_signing_keys_of_deployments_that_no_longer_exist_are_swept(world):
    world.apply_deployment("kept")
    kept = world.wait_for("signing keys of kept", lambda: world.signing_key_secret("kept"))
    # Left behind by deletions no operator saw: a deployment that is gone, and an earlier one of a live name.
    orphans = {
        f"orphan-gone-{os.getpid()}": signing_key_labels(world.namespace, "gone", str(uuid.uuid4())),
        f"orphan-stale-{os.getpid()}": signing_key_labels(world.namespace, "kept", str(uuid.uuid4())),
    }
    unrelated = f"unrelated-{os.getpid()}"
    data = {KEY_RING_DATA_KEY: base64.b64encode(serialize_key_ring(KeyRing()).encode()).decode()}
    for name, labels in orphans.items():
        world.core.create_namespaced_secret(world.key_namespace, {"metadata": {"name": name, "labels": labels},
                                                            "data": data})
    world.core.create_namespaced_secret(world.key_namespace, {"metadata": {"name": unrelated, "labels": {"team": "x"}},
                                                        "data": data})

    def names() -> set[str]:
        return {s.metadata.name for s in world.core.list_namespaced_secret(world.key_namespace).items}
    world.wait_for("orphaned signing keys swept", lambda: not (set(orphans) & names()), timeout=60)
    assert kept.metadata.name in names() and unrelated in names()
    assert world.signing_key_secret("kept").metadata.uid == kept.metadata.uid  # never deleted and recreated
    world.core.delete_namespaced_secret(unrelated, world.key_namespace)


def test_old_layout_keys_move_to_the_key_namespace_and_issued_tokens_stay_valid(world, operator):
    world.apply_deployment("legacy")
    world.create_apikey("bob", deployment="legacy")
    world.wait_ready("bob")
    token = world.token("bob")
    kid = jwt.get_unverified_header(token)["kid"]
    issued = world.apikey("bob")["status"]["tokenId"]
    dsd = world.deployment("legacy")

    # Back to what an earlier release left behind: the ring (plus a key never published) in the tenant's namespace,
    # controlled by the deployment, and nothing in the key namespace.
    operator.stop()
    new_secret = world.signing_key_secret("legacy")
    ring = ring_of(new_secret)
    unpublished = signing_key_from_seed(os.urandom(32), created_at=1, sign_from=1)
    world.core.delete_namespaced_secret(new_secret.metadata.name, world.key_namespace)
    owner = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment", "name": "legacy",
             "uid": dsd["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    old_ring = KeyRing((unpublished, *ring.keys))
    world.core.create_namespaced_secret(world.namespace, {
        "metadata": {"name": "legacy-signing-key", "ownerReferences": [owner],
                     "labels": {"app.kubernetes.io/component": "signing-key", "deepseek.ai/deployment": "legacy"}},
        "data": {KEY_RING_DATA_KEY: base64.b64encode(serialize_key_ring(old_ring).encode()).decode()}})
    assert world.signing_key_secret("legacy") is None

    operator.start()
    world.wait_for("old signing-key Secret deleted", lambda: world.secret("legacy-signing-key") is None, timeout=60)
    moved = world.signing_key_secret("legacy")
    assert moved is not None and kid in ring_of(moved).kids()
    assert ring_of(moved).kids() == ring.kids()  # same ids; the key that was never published is not carried over
    assert unpublished.kid not in published_kids(world, "legacy")
    assert world.verify(token, "legacy")["sub"] == "bob"
    # A few issuer checks later the key still signs and the token is the one issued before the move.
    world.wait_for("deployment signing with the moved key",
                   lambda: world.deployment("legacy")["status"].get("signingKeyId") == kid, timeout=30)
    world.create_apikey("carol", deployment="legacy")
    world.wait_ready("carol")
    assert jwt.get_unverified_header(world.token("carol"))["kid"] == kid
    assert world.apikey("bob")["status"]["tokenId"] == issued and world.token("bob") == token
    assert world.verify(token, "legacy")["sub"] == "bob"


def test_a_deployment_in_the_signing_key_namespace_gets_no_keys_and_no_pods(world):
    # Its pods could name any Secret of that namespace in a secretRef: every deployment's private keys.
    body = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment", "metadata": {"name": "inside"},
            "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:test",
                     "redis": {"secretRef": {"name": "any-secret-there"}}}}
    args = ("deepseek.ai", "v1alpha1", world.key_namespace, "deepseekdeployments")
    world.custom.create_namespaced_custom_object(*args, body)
    try:
        def refused() -> dict | None:
            dsd = world.custom.get_namespaced_custom_object(*args, "inside")
            conditions = (dsd.get("status") or {}).get("conditions") or []
            return next((c for c in conditions if c["type"] == "IssuerReady" and c["status"] == "False"
                         and c["reason"] == "InSigningKeyNamespace"), None)
        condition = world.wait_for("IssuerReady=False InSigningKeyNamespace", refused, timeout=30)
        assert "another namespace" in condition["message"]
        # The same spec in a tenant namespace gets its pods' Deployment: by then "inside" would have one too.
        apps = client.AppsV1Api(world.core.api_client)
        world.apply_deployment("outside", redis={"secretRef": {"name": "any-secret-there"}})
        world.wait_for("outside's Deployment", lambda: [d for d in apps.list_namespaced_deployment(
            world.namespace).items if d.metadata.name.startswith("outside-")], timeout=60)
        made = [d.metadata.name for d in apps.list_namespaced_deployment(world.key_namespace).items]
        assert not [n for n in made if n.startswith("inside")], made
        keys = world.core.list_namespaced_secret(world.key_namespace,
                                                 label_selector="deepseek.ai/deployment=inside").items
        assert not keys and world.core.list_namespaced_config_map(
            world.key_namespace, field_selector="metadata.name=inside-auth").items == []
    finally:
        world.custom.delete_namespaced_custom_object(*args, "inside")
