import pytest
from deepseek_operator.signing_keys import (
    KeyRing,
    RotationPolicy,
    build_jwks,
    next_key_ring_change,
    parse_key_ring,
    plan_key_ring,
    serialize_key_ring,
    signing_key_from_seed,
)

POLICY = RotationPolicy(rotation_interval=100, propagation_delay=10, retire_margin=5)


def key(n: int):
    return signing_key_from_seed(bytes([n]) * 32, created_at=0, sign_from=0)


def test_first_key_signs_at_once():
    ring = plan_key_ring(KeyRing(), now=1000, policy=POLICY, live_token_expiry={}, fresh_key=key(1))
    assert [k.kid for k in ring.keys] == [key(1).kid]
    assert ring.active(1000).kid == key(1).kid


def test_new_key_is_published_before_it_signs_and_takes_over_after_propagation():
    ring = plan_key_ring(KeyRing(), now=1000, policy=POLICY, live_token_expiry={}, fresh_key=key(1))
    unchanged = plan_key_ring(ring, now=1099, policy=POLICY, live_token_expiry={}, fresh_key=key(2))
    assert unchanged == ring
    rotated = plan_key_ring(ring, now=1100, policy=POLICY, live_token_expiry={}, fresh_key=key(2))
    assert [k.kid for k in rotated.keys] == [key(1).kid, key(2).kid]
    assert {k["kid"] for k in build_jwks(rotated)["keys"]} == {key(1).kid, key(2).kid}
    assert rotated.active(1105).kid == key(1).kid, "must not sign before propagation"
    assert rotated.active(1110).kid == key(2).kid
    # Only published keys sign: a key the servers do not know yet is never used.
    assert rotated.active(1110, published=frozenset({key(1).kid})).kid == key(1).kid


def test_old_key_stays_until_its_last_live_token_expired():
    ring = plan_key_ring(KeyRing(), now=1000, policy=POLICY, live_token_expiry={}, fresh_key=key(1))
    ring = plan_key_ring(ring, now=1100, policy=POLICY, live_token_expiry={}, fresh_key=key(2))
    live = {key(1).kid: 1200}
    kept = plan_key_ring(ring, now=1150, policy=POLICY, live_token_expiry=live, fresh_key=key(3))
    assert key(1).kid in kept.kids()
    assert next_key_ring_change(kept, now=1150, policy=POLICY, live_token_expiry=live) == 1200
    dropped = plan_key_ring(kept, now=1200, policy=POLICY, live_token_expiry=live, fresh_key=key(3))
    assert dropped.kids() == {key(2).kid}


def test_retired_key_kept_for_the_margin_even_without_tokens():
    ring = plan_key_ring(KeyRing(), now=1000, policy=POLICY, live_token_expiry={}, fresh_key=key(1))
    ring = plan_key_ring(ring, now=1100, policy=POLICY, live_token_expiry={}, fresh_key=key(2))
    assert key(1).kid in plan_key_ring(ring, now=1114, policy=POLICY, live_token_expiry={}, fresh_key=key(3)).kids()
    assert key(1).kid not in plan_key_ring(ring, now=1115, policy=POLICY, live_token_expiry={},
                                           fresh_key=key(3)).kids()


def test_jwks_holds_public_keys_only_and_ring_round_trips():
    ring = KeyRing((key(1),))
    jwk = build_jwks(ring)["keys"][0]
    assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
    assert jwk["alg"] == "EdDSA" and jwk["crv"] == "Ed25519"
    assert key(1).seed not in str(build_jwks(ring))
    assert parse_key_ring(serialize_key_ring(ring)) == ring
    with pytest.raises(ValueError, match="malformed"):
        parse_key_ring('{"keys": [{"kid": 1}]}')


def test_kid_is_a_stable_thumbprint_of_the_public_key():
    assert key(1).kid == key(1).kid and key(1).kid != key(2).kid and len(key(1).kid) == 16


def test_propagation_counts_from_publication_not_from_planning():
    ring = plan_key_ring(KeyRing(), now=1000, policy=POLICY, live_token_expiry={}, fresh_key=key(1))
    rotated = plan_key_ring(ring, now=1100, policy=POLICY, live_token_expiry={}, fresh_key=key(2),
                            published=frozenset({key(1).kid}))
    # Publishing the new key failed (the ConfigMap write was refused, the operator stopped); it is published later.
    late = plan_key_ring(rotated, now=1500, policy=POLICY, live_token_expiry={}, fresh_key=key(3),
                         published=frozenset({key(1).kid}))
    new = late.get(key(2).kid)
    assert new is not None and new.sign_from >= 1500 + POLICY.propagation_delay, (
        f"the new key would sign at {new.sign_from if new else None}, before servers had "
        f"{POLICY.propagation_delay} s to load it")
    assert late.active(1505, published=frozenset({key(1).kid, key(2).kid})).kid == key(1).kid
    # Once published, its schedule stays put.
    settled = plan_key_ring(late, now=1502, policy=POLICY, live_token_expiry={}, fresh_key=key(3),
                            published=frozenset({key(1).kid, key(2).kid}))
    assert settled == late
    assert settled.active(1510, published=frozenset({key(1).kid, key(2).kid})).kid == key(2).kid


def test_the_first_key_signs_at_once_even_before_its_publication_is_confirmed():
    ring = plan_key_ring(KeyRing(), now=1000, policy=POLICY, live_token_expiry={}, fresh_key=key(1))
    again = plan_key_ring(ring, now=1001, policy=POLICY, live_token_expiry={}, fresh_key=key(2),
                          published=frozenset())
    assert again == ring


def test_a_rotation_wakes_only_keys_waiting_for_a_signer() -> None:
    from deepseek_operator.auth_config import AuthDocuments
    from deepseek_operator.issuer import keys_to_wake

    def jwks(*kids: str) -> dict:
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": f"x-{kid}", "kid": kid} for kid in kids]}

    limits = {"requestsPerSecond": 5}
    published = AuthDocuments(jwks=jwks("k1"))
    assert keys_to_wake(None, jwks("k1"), None, limits) == "all"  # first written
    assert keys_to_wake(published, jwks("k1"), limits, limits) is None  # nothing that keys hold changed
    assert keys_to_wake(published, jwks("k1", "k2"), limits, limits) == "waiting"  # a new key: old tokens verify
    assert keys_to_wake(AuthDocuments(jwks=jwks("k1", "k2")), jwks("k2"), limits, limits) == "all"  # withdrawn
    assert keys_to_wake(published, jwks("k1"), limits, {"requestsPerSecond": 6}) == "all"  # new default limits
    assert keys_to_wake(published, jwks("k1", "k2"), limits, {"requestsPerSecond": 6}) == "all"
