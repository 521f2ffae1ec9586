"""The server's token verification (written out for EdDSA) refuses what PyJWT's decoder refused, with the same
reasons: tampered or malformed tokens, other algorithms, claims of the wrong type, and the audience as a list."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from deepseek_server.auth.documents import parse_auth_state
from deepseek_server.auth.guard import Authenticator
from deepseek_server.auth.tokens import TokenRejected, verify_token
from deepseek_server.errors import APIError

ISS, AUD = "deepseek-operator/ns/chat", "ns/chat"
PRIVATE = Ed25519PrivateKey.generate()
X = base64.urlsafe_b64encode(PRIVATE.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).rstrip(b"=").decode()
STATE = parse_auth_state({
    "config": {"issuer": ISS, "audience": AUD, "defaultLimits": {"rps": 10, "burst": 20}},
    "jwks": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": X, "kid": "k1", "use": "sig", "alg": "EdDSA"}]},
})


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "alice", "scope": ["model:predict"], "env": "prod", "uid": "uid-1",
            "jti": "j1", "iat": now, "nbf": now, "exp": now + 600, **overrides}
    return {k: v for k, v in base.items() if v is not None}


def token(headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), PRIVATE, algorithm="EdDSA", headers={"kid": "k1", **(headers or {})})


def segment(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def signed(payload: dict[str, Any]) -> str:
    """A correctly signed token around any payload (PyJWT's encoder refuses some of the ones tested here)."""
    signing_input = segment({"alg": "EdDSA", "typ": "JWT", "kid": "k1"}) + "." + segment(payload)
    signature = base64.urlsafe_b64encode(PRIVATE.sign(signing_input.encode())).rstrip(b"=").decode()
    return f"{signing_input}.{signature}"


def test_the_principal_carries_the_claims_and_when_the_token_became_valid() -> None:
    now = int(time.time())
    principal = verify_token(token(iat=now - 5, nbf=now - 10, aud=[AUD, "other"]), STATE)
    assert (principal.uid, principal.token_id, principal.expires_at) == ("uid-1", "j1", now + 600)
    assert principal.not_before == now - 5


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: "not-a-token", "not a well-formed token"),
    (lambda: "a.b", "not a well-formed token"),
    (lambda: "%%%." + token().split(".", 1)[1], "not a well-formed token"),
    (lambda: segment({"alg": "none", "kid": "k1"}) + "." + segment(claims()) + ".", "only EdDSA"),
    (lambda: token(headers={"kid": "k2"}), "unknown key"),
    # Critical extensions: none is supported, so a token that lists any is invalid (PyJWT supports only "b64").
    (lambda: token(headers={"crit": ["exp"], "exp": 1}), "critical extensions"),
    (lambda: token(headers={"crit": ["b64"], "b64": True}), "critical extensions"),
    # The payload of one token with the signature of another.
    (lambda: token().rsplit(".", 1)[0].rsplit(".", 1)[0] + "." + segment(claims(sub="mallory")) + "."
     + token().rsplit(".", 1)[1], "signature does not verify"),
    (lambda: token(exp="soon"), "Expiration Time claim"),
    (lambda: token(iat=int(time.time()) + 90), "not valid yet"),
    (lambda: token(aud=["ns/other"]), "another deployment"),
    (lambda: token(aud=7), "another deployment"),
    (lambda: signed(claims(iss=["x"])), "issuer"),
    (lambda: signed(claims(iss="someone-else")), "issuer"),
    (lambda: token(uid=None), "'uid'"),
    (lambda: token(scope="model:predict"), "scope claim must be a list"),
    (lambda: token(env="staging"), "env claim"),
])
def test_refused_with_a_reason(make: Any, reason: str) -> None:
    with pytest.raises(TokenRejected, match=reason):
        verify_token(make(), STATE)


def test_remembered_headers_are_rechecked_for_scope_expiry_and_form() -> None:
    """The verified-token cache is keyed by the Authorization header as sent: a hit skips parsing and verification,
    but not the scope and expiry checks; a header that is not 'Bearer <key>' is never accepted, and a new auth state
    (a revocation) forgets what was remembered."""
    now = [time.time()]
    authenticator = Authenticator(clock=lambda: now[0])
    authenticator.set_state(STATE)
    key = token(exp=int(now[0]) + 100)
    assert authenticator.authenticate(f"Bearer {key}", "model:predict").uid == "uid-1"
    assert authenticator.authenticate(f"bearer  {key}", "model:predict").uid == "uid-1"  # another spelling
    assert authenticator.authenticate(f"Bearer {key}", "model:predict").uid == "uid-1"  # a hit
    with pytest.raises(APIError) as scope:
        authenticator.authenticate(f"Bearer {key}", "history:read")  # a hit still checks the scope
    assert scope.value.status == 403
    for header in (f"Basic {key}", "Bearer ", "Bearer", f"{key}"):
        with pytest.raises(APIError) as malformed:
            authenticator.authenticate(header, "model:predict")
        assert malformed.value.status == 401 and "'Bearer <key>'" in malformed.value.message, header
    authenticator.set_state(dataclasses.replace(STATE, revoked={"j1": int(now[0]) + 600}))
    with pytest.raises(APIError, match="revoked"):
        authenticator.authenticate(f"Bearer {key}", "model:predict")
    authenticator.set_state(STATE)
    assert authenticator.authenticate(f"Bearer {key}", "model:predict").uid == "uid-1"
    now[0] += 200  # past exp and the leeway: the remembered principal is not returned
    with pytest.raises(APIError, match="expired"):
        authenticator.authenticate(f"Bearer {key}", "model:predict")


def numeric_date_cases() -> list[Any]:
    now = int(time.time())
    cases = []
    for name, good in (("iat", now), ("nbf", now), ("exp", now + 600)):
        cases += [pytest.param(name, str(good), id=f"{name}-string"), pytest.param(name, True, id=f"{name}-true"),
                  pytest.param(name, good + 0.5, id=f"{name}-fraction"),
                  pytest.param(name, float(good), id=f"{name}-float")]
    return cases


@pytest.mark.parametrize(("name", "value"), numeric_date_cases())
def test_times_must_be_json_integers(name: str, value: Any) -> None:
    """`iat`, `nbf` and `exp` are JSON integers as the operator writes them: a string such as "1796513217", a
    boolean (an int to Python) or a number with a fraction or exponent is a malformed token, refused with 401."""
    key = signed(claims(**{name: value}))
    with pytest.raises(TokenRejected, match=rf"\({name}\) must be an integer"):
        verify_token(key, STATE)
    authenticator = Authenticator()
    authenticator.set_state(STATE)
    with pytest.raises(APIError) as refused:
        authenticator.authenticate(f"Bearer {key}", "model:predict")
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")


def test_unknown_scopes_are_accepted_and_grant_nothing() -> None:
    authenticator = Authenticator()
    authenticator.set_state(STATE)
    key = token(scope=["model:predict", "models:admin"])
    assert authenticator.authenticate(f"Bearer {key}", "model:predict").scopes == {"model:predict", "models:admin"}
    assert authenticator.authenticate(f"Bearer {key}", None).uid == "uid-1"  # /v1/models: any valid key
    with pytest.raises(APIError) as refused:
        authenticator.authenticate(f"Bearer {key}", "history:read")
    assert (refused.value.status, refused.value.code) == (403, "insufficient_scope")


@pytest.mark.parametrize("remembered", [False, True], ids=["fresh", "remembered"])
def test_the_leeway_ends_at_the_same_instant_whether_or_not_the_token_was_remembered(remembered: bool) -> None:
    """A token is accepted until 30 s after its `exp` and refused from that instant on, and accepted from 30 s before
    its `nbf`, whether the request verifies it afresh or finds it among the tokens already verified."""
    issued = int(time.time())
    expires = issued + 100
    key = f"Bearer {token(iat=issued, nbf=issued, exp=expires)}"
    now = [float(issued)]

    def authenticate_at(at: float) -> str:
        authenticator = Authenticator(clock=lambda: now[0])
        authenticator.set_state(STATE)
        if remembered:
            now[0] = issued + 50.0
            authenticator.authenticate(key, "model:predict")
        now[0] = at
        try:
            return authenticator.authenticate(key, "model:predict").uid
        except APIError as exc:
            return exc.message

    assert authenticate_at(expires + 29.5) == "uid-1"
    assert "expired" in authenticate_at(expires + 30)
    assert authenticate_at(issued - 30) == "uid-1"  # a server clock 30 s behind the operator's
    assert "not valid yet" in authenticate_at(issued - 30.5)
