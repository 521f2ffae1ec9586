"""The server's side of docs/auth-contract.md: documents, ConfigMap forms, and token verification rules."""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from deepseek_server.auth.configmap_source import ConfigMapAuthSource, parse_configmap_ref, state_from_configmap
from deepseek_server.auth.documents import documents_from_configmap, parse_auth_state
from deepseek_server.auth.tokens import TokenRejected, verify_token

ISS, AUD = "deepseek-operator/ns/chat", "ns/chat"
PRIVATE = Ed25519PrivateKey.generate()
X = base64.urlsafe_b64encode(PRIVATE.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).rstrip(b"=").decode()
DOCS: dict[str, Any] = {
    "config": {"issuer": ISS, "audience": AUD, "generation": 7,
               "defaultLimits": {"rps": 10, "burst": 20, "tpm": None, "parallel": None}},
    "jwks": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": X, "kid": "k1", "use": "sig", "alg": "EdDSA"}]},
    "revoked": {"gone-jti": int(time.time()) + 24 * 3600},
    "limits": {"uid-vip": {"rps": 100, "burst": 200, "tpm": 100000, "parallel": 4}},
}


def token(**overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": AUD, "sub": "alice", "scope": ["model:predict"], "env": "prod", "uid": "uid-1",
              "jti": "abcdefghijklmnopqrstuv", "iat": now, "nbf": now, "exp": now + 600, **overrides}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, PRIVATE, algorithm="EdDSA",
                      headers={"kid": "k1"})


def test_documents_parse_into_state() -> None:
    state = parse_auth_state(DOCS)
    assert (state.issuer, state.audience, state.generation) == (ISS, AUD, 7)
    assert set(state.keys) == {"k1"}
    assert state.limits_for("uid-vip").parallel == 4
    assert state.limits_for("anyone-else").rps == 10


def test_configmap_accepts_plain_and_gzip_forms() -> None:
    data = {f"{name}.json": json.dumps(doc) for name, doc in DOCS.items() if name != "limits"}
    binary = {"limits.json.gz": base64.b64encode(gzip.compress(json.dumps(DOCS["limits"]).encode())).decode()}
    assert documents_from_configmap(data, binary) == DOCS
    state = state_from_configmap({"metadata": {"resourceVersion": "5"}, "data": data, "binaryData": binary})
    assert state.limits_for("uid-vip").burst == 200


def test_configmap_object_from_the_kubernetes_client() -> None:
    from kubernetes.client import V1ConfigMap, V1ObjectMeta

    applied = []
    source = ConfigMapAuthSource("ns/chat-auth", applied.append)
    cm = V1ConfigMap(metadata=V1ObjectMeta(name="chat-auth", resource_version="11"),
                     data={f"{n}.json": json.dumps(d) for n, d in DOCS.items()})
    assert source.apply(cm) and len(applied) == 1
    assert source.apply(cm) and len(applied) == 1  # same resourceVersion: nothing to do
    broken = V1ConfigMap(metadata=V1ObjectMeta(name="chat-auth", resource_version="12"), data={"config.json": "{"})
    assert not source.apply(broken) and len(applied) == 1  # keeps the last good state


@pytest.mark.parametrize("ref", ["chat-auth", "/chat", "ns/", "a/b/c", ""])
def test_configmap_ref_must_be_namespace_slash_name(ref: str) -> None:
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        parse_configmap_ref(ref)


@pytest.mark.parametrize(("change", "message"), [
    ({"config": None}, "lacks config.json"),
    ({"jwks": {"keys": [{"kty": "RSA", "kid": "r"}]}}, "Ed25519"),
    ({"jwks": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": X, "kid": "k", "d": X}]}}, "private"),
    ({"jwks": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": X}]}}, "kid"),
    ({"revoked": ["jti"]}, "revoked.json"),
    ({"config": {"issuer": ISS, "audience": "", "defaultLimits": {"rps": 1, "burst": 1}}}, "audience"),
])
def test_bad_documents_are_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    docs = {k: v for k, v in {**DOCS, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        parse_auth_state(docs)


def test_a_good_token_verifies() -> None:
    principal = verify_token(token(), parse_auth_state(DOCS))
    assert (principal.uid, principal.subject, principal.env) == ("uid-1", "alice", "prod")
    assert principal.scopes == {"model:predict"}


# Times are offsets from the moment the test runs (not from collection: a long session would shift them).
@pytest.mark.parametrize(("overrides", "reason"), [
    (lambda now: {"exp": now - 90, "iat": now - 200, "nbf": now - 200}, "expired"),
    (lambda now: {"nbf": now + 90}, "not valid yet"),
    (lambda now: {"aud": "ns/other"}, "another deployment"),
    (lambda now: {"iss": "someone"}, "issuer"),
    (lambda now: {"env": None}, "'env'"),
    (lambda now: {"scope": None}, "'scope'"),
    (lambda now: {"jti": "gone-jti"}, "revoked"),
])
def test_rejections_say_why(overrides: Callable[[int], dict[str, Any]], reason: str) -> None:
    with pytest.raises(TokenRejected, match=reason):
        verify_token(token(**overrides(int(time.time()))), parse_auth_state(DOCS))


def test_thirty_seconds_of_clock_skew_are_allowed() -> None:
    now = int(time.time())
    verify_token(token(exp=now - 20, iat=now - 100, nbf=now - 100), parse_auth_state(DOCS))
    verify_token(token(nbf=now + 20, iat=now + 20), parse_auth_state(DOCS))


def test_revoked_token_carries_its_principal_for_the_audit() -> None:
    with pytest.raises(TokenRejected) as excinfo:
        verify_token(token(jti="gone-jti"), parse_auth_state(DOCS))
    assert excinfo.value.principal is not None and excinfo.value.principal.uid == "uid-1"
