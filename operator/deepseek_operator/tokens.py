"""Token claims and signing per docs/auth-contract.md (pure: the token id, times and key are passed in)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from .signing_keys import SigningKey


@dataclass(frozen=True)
class TokenGrant:
    """Everything one token says."""

    issuer: str
    audience: str
    subject: str
    scopes: tuple[str, ...]
    environment: str
    apikey_uid: str
    token_id: str
    issued_at: int
    expires_at: int


def build_claims(grant: TokenGrant) -> dict[str, Any]:
    """The JWT claims of a grant."""
    return {
        "iss": grant.issuer,
        "aud": grant.audience,
        "sub": grant.subject,
        "scope": list(grant.scopes),
        "env": grant.environment,
        "uid": grant.apikey_uid,
        "jti": grant.token_id,
        "iat": grant.issued_at,
        # Not backdated: servers check `iat` as strictly as `nbf`, so their leeway (TOKEN_LEEWAY_SECONDS, on both)
        # is what lets a server whose clock runs behind the operator's accept a fresh token.
        "nbf": grant.issued_at,
        "exp": grant.expires_at,
    }


def sign_token(grant: TokenGrant, key: SigningKey) -> str:
    """The JWS compact token (EdDSA, header `kid` and `typ`); Ed25519 signatures are deterministic."""
    return jwt.encode(build_claims(grant), key.private_key(), algorithm="EdDSA", headers={"kid": key.kid, "typ": "JWT"})


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a token: how status recognises a token without storing it."""
    return hashlib.sha256(token.encode("ascii", errors="replace")).hexdigest()


def token_key_id(token: str) -> str | None:
    """The `kid` in a token's header, or None if it is not a readable JWS."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return kid if isinstance(kid, str) else None


def binding_hash(*, subject: str, scopes: Sequence[str], environment: str, audience: str) -> str:
    """What a token binds, hashed: a change of any of these needs a new token."""
    text = json.dumps([subject, sorted(scopes), environment, audience], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def verified_claims(
    token: str, keys: Mapping[str, SigningKey], *, issuer: str, audience: str, apikey_uid: str, now: float
) -> dict[str, Any] | None:
    """The claims of `token` if one of `keys` signed it for this ApiKey and it has not expired, else None.

    Lets a reconcile recognise a token it wrote to the Secret before it could record it in status.
    """
    kid = token_key_id(token)
    key = keys.get(kid) if kid else None
    if key is None:
        return None
    try:
        claims = jwt.decode(token, key.private_key().public_key(), algorithms=["EdDSA"], audience=audience,
                            issuer=issuer, options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    except jwt.PyJWTError:
        return None
    if claims.get("uid") != apikey_uid or not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
        return None
    claims["kid"] = kid
    return dict(claims)
