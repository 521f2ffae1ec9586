"""One deployment with 100,000 ApiKeys with their own limits and 50,000 live revocations: the operator's real
builder spreads them so that no ConfigMap nears the 1 MiB cap, and the server's parser gives every entry back."""

from __future__ import annotations

import base64
import json
import random
import uuid

import pytest
from deepseek_operator.auth_config import (
    CONFIGMAP_LIMIT,
    INLINE_BUDGET,
    SHARD_COUNT,
    AuthDocuments,
    Limits,
    RevokeTokens,
    SetKeyLimits,
    build_auth_object,
    build_issuer_config,
    decode_layout,
    fit_changes,
    outgrows_inline,
)
from deepseek_operator.signing_keys import KeyRing, build_jwks, signing_key_from_seed

documents = pytest.importorskip("deepseek_server.auth.documents")

NOW = 1_800_000_000
KEYS, REVOKED = 100_000, 50_000
OBJECT_BUDGET = 900 * 1024


def _changes(rng: random.Random) -> tuple[RevokeTokens, list[SetKeyLimits]]:
    revoked = {base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode(): NOW + rng.randrange(72 * 3600)
               for _ in range(REVOKED)}
    limits = [SetKeyLimits(str(uuid.UUID(bytes=rng.randbytes(16), version=4)), Limits(
        rps=rng.choice([1, 2, 5, 20, 50]), burst=rng.choice([5, 10, 40, 100]),
        tpm=rng.choice([None, 10_000, 100_000]), parallel=rng.choice([None, 1, 4])).as_document())
        for _ in range(KEYS)]
    return RevokeTokens(revoked), limits


def test_100k_keys_and_50k_revocations_fit_in_shards_far_below_the_cap():
    base = AuthDocuments(
        config=build_issuer_config(issuer="deepseek-operator/ns/chat", audience="ns/chat",
                                   default_limits=Limits(10, 20), generation=1),
        jwks=build_jwks(KeyRing(tuple(signing_key_from_seed(bytes([i]) * 32, created_at=0, sign_from=i)
                                      for i in range(3)))))
    revoke, limits = _changes(random.Random(12))
    groups = [[revoke], limits]
    # What the store does: the inline layout cannot take it, so the entries move to shards, and nothing waits.
    inline = fit_changes(base, groups, now=NOW, shards=0)
    assert inline.size > CONFIGMAP_LIMIT and outgrows_inline(inline, 0)
    fitted = fit_changes(base, groups, now=NOW, shards=SHARD_COUNT)
    assert fitted.refused == () and fitted.layout is not None
    layout = fitted.layout
    names = layout.names("chat-auth")
    assert len(names) == SHARD_COUNT + 1
    bodies = [build_auth_object(name=name, namespace="ns", labels={}, owner_references=[], content=content)
              for name, content in zip(names, layout.contents, strict=True)]
    sizes = {name: size for name, size in zip(names, layout.sizes, strict=True)}
    print(f"{KEYS} keys, {REVOKED} revoked -> {len(names)} ConfigMaps, largest {max(sizes.values()) / 1024:.0f} KiB, "
          f"all {sum(sizes.values()) / 1024:.0f} KiB")
    for name, size in sizes.items():
        assert size < OBJECT_BUDGET, f"{name}: {size / 1024:.0f} KiB"
        assert size < INLINE_BUDGET / 2, f"{name}: {size / 1024:.0f} KiB leaves no room to grow"
    for body in bodies:
        # The API request carries binaryData base64-encoded: under etcd's 1.5 MiB request cap too.
        assert len(json.dumps(body)) < 1.5 * 1024 * 1024

    # The operator reads back exactly what it wrote.
    contents = [(body["data"], body.get("binaryData")) for body in bodies]
    assert decode_layout(contents[0], contents[1:]) == fitted.documents
    assert len(fitted.documents.limits) == KEYS and len(fitted.documents.revoked) == REVOKED

    # The server's parser gives back every entry, with its value.
    index = documents.documents_from_configmap(*contents[0])
    shards = [documents.shard_documents_from_configmap(i, *content) for i, content in enumerate(contents[1:])]
    state = documents.parse_auth_state(index, shards)
    assert len(state.revoked) == REVOKED and len(state.limits) == KEYS
    assert all(state.revoked[jti] == exp for jti, exp in revoke.entries.items())
    for change in limits:
        expected = change.limits
        assert expected is not None
        got = state.limits_for(change.apikey_uid)
        assert (got.rps, got.burst, got.tpm, got.parallel) == (
            expected["rps"], expected["burst"], expected["tpm"], expected["parallel"])
    assert "not-revoked" not in state.revoked and state.limits_for("unknown-uid") == state.default_limits
