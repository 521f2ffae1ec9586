import jwt
import pytest
from deepseek_operator.signing_keys import KeyRing, build_jwks, signing_key_from_seed
from deepseek_operator.tokens import TokenGrant, binding_hash, sign_token, token_key_id, token_sha256

KEY = signing_key_from_seed(b"\x07" * 32, created_at=0, sign_from=0)
GRANT = TokenGrant(issuer="deepseek-operator/ns/chat", audience="ns/chat", subject="alice",
                   scopes=("history:read", "model:predict"), environment="prod", apikey_uid="uid-1",
                   token_id="AAAAAAAAAAAAAAAAAAAAAA", issued_at=1_700_000_000, expires_at=1_700_003_600)


def verify(token: str, audience: str = "ns/chat"):
    jwk = jwt.PyJWKSet.from_dict(build_jwks(KeyRing((KEY,))))[token_key_id(token)]
    return jwt.decode(token, jwk.key, algorithms=["EdDSA"], audience=audience, issuer="deepseek-operator/ns/chat",
                      options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})


def test_token_follows_the_contract_and_verifies_with_the_public_jwks():
    token = sign_token(GRANT, KEY)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": KEY.kid}
    claims = verify(token)
    assert claims == {"iss": "deepseek-operator/ns/chat", "aud": "ns/chat", "sub": "alice",
                      "scope": ["history:read", "model:predict"], "env": "prod", "uid": "uid-1",
                      "jti": "AAAAAAAAAAAAAAAAAAAAAA", "iat": 1_700_000_000, "nbf": 1_700_000_000,
                      "exp": 1_700_003_600}


def test_token_for_one_deployment_is_refused_by_another():
    with pytest.raises(jwt.InvalidAudienceError):
        verify(sign_token(GRANT, KEY), audience="ns/other")


def test_signing_is_deterministic_and_hash_identifies_the_token():
    assert sign_token(GRANT, KEY) == sign_token(GRANT, KEY)
    assert token_sha256(sign_token(GRANT, KEY)) != token_sha256(sign_token(GRANT, KEY) + "x")
    assert token_key_id("not a token") is None


def test_binding_hash_changes_with_what_the_token_binds_only():
    base = binding_hash(subject="a", scopes=["model:predict"], environment="dev", audience="n/x")
    assert base == binding_hash(subject="a", scopes=["model:predict"], environment="dev", audience="n/x")
    assert base != binding_hash(subject="b", scopes=["model:predict"], environment="dev", audience="n/x")
    assert base != binding_hash(subject="a", scopes=["history:read"], environment="dev", audience="n/x")
    assert base != binding_hash(subject="a", scopes=["model:predict"], environment="prod", audience="n/x")


def test_verified_claims_recognise_only_our_live_token_for_this_key():
    from deepseek_operator.tokens import verified_claims

    token = sign_token(GRANT, KEY)
    keys = {KEY.kid: KEY}
    args = {"issuer": "deepseek-operator/ns/chat", "audience": "ns/chat"}
    claims = verified_claims(token, keys, apikey_uid="uid-1", now=GRANT.issued_at, **args)
    assert claims is not None and claims["jti"] == GRANT.token_id and claims["kid"] == KEY.kid
    assert verified_claims(token, keys, apikey_uid="uid-2", now=GRANT.issued_at, **args) is None
    assert verified_claims(token, {}, apikey_uid="uid-1", now=GRANT.issued_at, **args) is None
    assert verified_claims(token, keys, apikey_uid="uid-1", now=GRANT.expires_at, **args) is None
    assert verified_claims(token, keys, apikey_uid="uid-1", now=GRANT.issued_at, issuer="x", audience="ns/chat") \
        is None
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert verified_claims(forged, keys, apikey_uid="uid-1", now=GRANT.issued_at, **args) is None
