import base64
import gzip
import json
import random
import uuid

import pytest
from deepseek_operator.auth_config import (
    CONFIGMAP_LIMIT,
    GZIP_THRESHOLD,
    REVOCATION_PRUNE_MARGIN_SECONDS,
    TOKEN_LEEWAY_SECONDS,
    AuthDocuments,
    Limits,
    PublishIssuer,
    RevokeTokens,
    SetKeyLimits,
    apply_changes,
    build_auth_configmap,
    build_issuer_config,
    configmap_size,
    decode_documents,
    encode_documents,
    limits_from_spec,
)
from deepseek_operator.signing_keys import KeyRing, build_jwks, signing_key_from_seed

NOW = 1_800_000_000


def test_revocations_are_added_and_pruned_once_no_server_accepts_the_token():
    # Servers accept a token up to TOKEN_LEEWAY_SECONDS past its exp; its revocation must outlive that.
    keep_until = TOKEN_LEEWAY_SECONDS + REVOCATION_PRUNE_MARGIN_SECONDS
    docs = apply_changes(AuthDocuments(), [RevokeTokens({"a": NOW + 10, "b": NOW - keep_until - 1})], now=NOW)
    assert docs.revoked == {"a": NOW + 10}
    later = apply_changes(docs, [RevokeTokens({"c": NOW + 100})], now=NOW + 10 + keep_until + 1)
    assert later.revoked == {"c": NOW + 100}


def test_a_revocation_outlives_the_servers_leeway_past_expiry():
    docs = apply_changes(AuthDocuments(), [RevokeTokens({"a": NOW})], now=NOW - 100)
    for late in (1, TOKEN_LEEWAY_SECONDS, TOKEN_LEEWAY_SECONDS + REVOCATION_PRUNE_MARGIN_SECONDS):
        assert apply_changes(docs, [], now=NOW + late).revoked == {"a": NOW}, (
            f"revocation pruned {late} s after exp, while servers still accept the token")
    assert REVOCATION_PRUNE_MARGIN_SECONDS > 0


def test_limits_entries_set_and_removed_by_uid_and_issuer_part_replaced():
    docs = apply_changes(AuthDocuments(), [SetKeyLimits("u1", Limits(5, 10).as_document())], now=NOW)
    assert docs.limits == {"u1": {"rps": 5, "burst": 10, "tpm": None, "parallel": None}}
    docs = apply_changes(docs, [SetKeyLimits("u1", None), PublishIssuer({"issuer": "i"}, {"keys": []})], now=NOW)
    assert docs.limits == {} and docs.config == {"issuer": "i"}


def test_limits_from_spec_fall_back_to_the_deployment_defaults():
    defaults = Limits(rps=10, burst=20, tpm=1000, parallel=None)
    assert limits_from_spec({"requestsPerSecond": 2.5}, defaults) == Limits(2.5, 20, 1000, None)
    assert limits_from_spec(None) == Limits(10, 20, None, None)
    assert Limits(2.5, 3).as_document()["rps"] == 2.5


def test_small_documents_are_plain_json_and_round_trip():
    docs = AuthDocuments(config=build_issuer_config(issuer="i", audience="a", default_limits=Limits(10, 20),
                                                    generation=3),
                         jwks=build_jwks(KeyRing((signing_key_from_seed(b"\x01" * 32, created_at=0, sign_from=0),))),
                         revoked={"x": NOW}, limits={})
    data, binary = encode_documents(docs)
    assert set(data) == {"config.json", "jwks.json", "revoked.json", "limits.json"} and binary == {}
    assert json.loads(data["config.json"]) == {"issuer": "i", "audience": "a", "generation": 3,
                                               "defaultLimits": {"rps": 10, "burst": 20, "tpm": None,
                                                                 "parallel": None}}
    assert decode_documents(data, binary) == docs


def test_a_document_past_256_kib_switches_to_gzip_and_is_written_in_one_form_only():
    revoked = {f"{i:022d}": NOW + i for i in range(12_000)}
    docs = AuthDocuments(revoked=revoked)
    data, binary = encode_documents(docs)
    assert "revoked.json" not in data and "revoked.json.gz" in binary
    plain = gzip.decompress(base64.b64decode(binary["revoked.json.gz"]))
    assert len(plain) > GZIP_THRESHOLD
    assert decode_documents(data, binary).revoked == revoked
    assert encode_documents(docs) == (data, binary), "encoding must be deterministic (no gzip mtime)"


def _jti(rng: random.Random) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode()


def _ten_thousand_keys(rng: random.Random, *, revoked_per_key: float, custom_share: float) -> AuthDocuments:
    ring = KeyRing(tuple(signing_key_from_seed(bytes([i]) * 32, created_at=0, sign_from=i) for i in range(3)))
    uids = [str(uuid.UUID(bytes=rng.randbytes(16), version=4)) for _ in range(10_000)]
    revoked = {_jti(rng): NOW + rng.randrange(72 * 3600) for _ in range(int(10_000 * revoked_per_key))}
    limits = {
        uid: Limits(rps=rng.choice([1, 2, 5, 20, 50]), burst=rng.choice([5, 10, 40, 100]),
                    tpm=rng.choice([None, 10_000, 100_000]), parallel=rng.choice([None, 1, 4])).as_document()
        for uid in uids if rng.random() < custom_share
    }
    return AuthDocuments(
        config=build_issuer_config(issuer="deepseek-operator/ns/chat", audience="ns/chat",
                                   default_limits=Limits(10, 20), generation=1),
        jwks=build_jwks(ring), revoked=revoked, limits=limits,
    )


@pytest.mark.parametrize(("label", "revoked_per_key", "custom_share", "budget"), [
    # 72h tokens renewed 24h early with 1h grace: about half the keys have one revoked token alive, plus 5 % of
    # keys revoked outright; one key in ten has its own limits.
    ("realistic", 0.55, 0.10, 512 * 1024),
    # Every key rotated twice within one token lifetime and every key with its own limits.
    ("worst case", 2.0, 1.0, CONFIGMAP_LIMIT),
])
def test_ten_thousand_keys_fit_in_one_configmap(label, revoked_per_key, custom_share, budget):
    docs = _ten_thousand_keys(random.Random(4), revoked_per_key=revoked_per_key, custom_share=custom_share)
    body = build_auth_configmap(name="chat-auth", namespace="ns", labels={}, owner_references=[], documents=docs)
    size = configmap_size(body["data"], body.get("binaryData", {}))
    print(f"{label}: {len(docs.revoked)} revoked, {len(docs.limits)} limits -> {size / 1024:.0f} KiB")
    assert size < budget
    # The API server's request carries binaryData base64-encoded: keep that under etcd's 1.5 MiB request cap too.
    assert len(json.dumps(body)) < 1.5 * 1024 * 1024
    assert decode_documents(body["data"], body.get("binaryData")) == docs


def test_a_configmap_missing_a_document_is_unreadable_not_empty_when_read_as_written():
    data, binary = encode_documents(AuthDocuments(jwks={"keys": [{"kid": "k1"}]}))
    del data["jwks.json"]
    assert decode_documents(data, binary).published_kids() == frozenset()  # lenient: what a reader may accept
    with pytest.raises(ValueError, match=r"jwks\.json is missing"):
        decode_documents(data, binary, complete=True)


def test_over_the_new_entry_budget_only_new_entries_are_left_out():
    from deepseek_operator.auth_config import NEW_ENTRY_BUDGET, documents_size, fit_changes

    rng = random.Random(3)
    base = AuthDocuments(revoked={_jti(rng): NOW + rng.randrange(72 * 3600) for _ in range(38_000)},
                         limits={"old": Limits(5, 10).as_document()})
    assert documents_size(base) > NEW_ENTRY_BUDGET
    revoke = RevokeTokens({"late": NOW + 60})
    groups = [[revoke, SetKeyLimits("new", Limits(1, 2).as_document())],
              [SetKeyLimits("old", None)], [SetKeyLimits("edited", None)]]
    fitted = fit_changes(base, groups, now=NOW)
    assert fitted.refused == (0,)
    assert "late" in fitted.documents.revoked and "new" not in fitted.documents.limits
    assert "old" not in fitted.documents.limits
    assert fitted.size == documents_size(fitted.documents) < CONFIGMAP_LIMIT
    # Under the budget nothing is left out.
    small = fit_changes(AuthDocuments(), groups, now=NOW)
    assert small.refused == () and "new" in small.documents.limits


def test_a_write_that_touches_a_few_keys_spreads_only_their_shards_again_and_equals_a_full_spread():
    from deepseek_operator.auth_config import build_layout, fit_changes, split_entries

    rng = random.Random(8)
    base = AuthDocuments(revoked={_jti(rng): NOW + rng.randrange(3600) for _ in range(2_000)},
                         limits={f"uid-{i}": Limits(1 + i % 3, 5).as_document() for i in range(3_000)})
    expiring = next(iter(base.revoked))
    base = AuthDocuments(revoked={**base.revoked, expiring: NOW - 3600}, limits=base.limits)
    previous = build_layout(base, 8)
    groups = [[RevokeTokens({"new-jti": NOW + 60}), SetKeyLimits("uid-1", None),
               SetKeyLimits("uid-9", Limits(9, 9).as_document()), SetKeyLimits("uid-new", Limits(2, 2).as_document())]]
    fitted = fit_changes(base, groups, now=NOW, shards=8, previous=previous)
    assert fitted.layout is not None
    assert fitted.layout == build_layout(fitted.documents, 8), "incremental and full spread differ"
    assert fitted.layout.entries == split_entries(fitted.documents, 8)
    assert expiring not in fitted.documents.revoked, "the pruned revocation left its shard too"
    changed = sum(a != b for a, b in zip(previous.contents, fitted.layout.contents, strict=True))
    assert changed <= 5  # the shards of new-jti, uid-1, uid-9, uid-new and the pruned id, at most
