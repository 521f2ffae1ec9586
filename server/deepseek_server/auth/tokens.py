"""Verify an API key (a JWT) against the loaded auth state, exactly as docs/auth-contract.md requires.

The checks are PyJWT's (`jwt.decode` with the algorithm pinned, every claim required, `aud`/`iss` checked, 30 s of
leeway on `iat`, `nbf` and `exp`), stricter on the times (JSON integers only), written out for the one algorithm the
contract allows: a cache miss costs the Ed25519 verification and little else (about half of what the general-purpose
decoder spends), which keeps a server that has just loaded a new auth state (and so forgotten every verified token)
fast.
"""

from __future__ import annotations

import binascii
import json
import time
from base64 import urlsafe_b64decode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature

from deepseek_server.auth.documents import AuthState

ALGORITHM = "EdDSA"
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("iss", "aud", "sub", "scope", "env", "uid", "jti", "iat", "nbf", "exp")
ENVIRONMENTS = ("dev", "test", "prod")


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token; `not_before` is the later of its `nbf` and `iat`."""

    uid: str
    subject: str
    token_id: str
    scopes: frozenset[str]
    env: str
    expires_at: int
    not_before: int = 0


class TokenRejected(Exception):
    """The token is not acceptable; `principal` is set when the token was genuine but revoked (for the audit)."""

    def __init__(self, message: str, principal: Principal | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.principal = principal


def _segment(text: str) -> bytes:
    """One base64url segment of a JWS (padding optional); ValueError when it is not one."""
    raw = text.encode("ascii")
    return urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


def _json_object(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _integer_claim(claims: dict[str, Any], name: str, what: str) -> int:
    """A time claim as the operator writes it: a JSON integer. Not `int(value)`, which takes "1796513217" and `true`
    (a bool is an int to Python); a fraction or exponent (RFC 7519 allows one) is refused too, as no issuer of
    this contract writes one and truncating it would move the instant."""
    value = claims[name]
    if type(value) is not int:
        raise TokenRejected(f"The API key is invalid: {what} claim ({name}) must be an integer (seconds since the "
                            f"epoch, a JSON number without fraction or exponent), not {_json_kind(value)}.")
    return value


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", str: "a string", float: "a number with a fraction or exponent", list: "a list",
             dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def verify_token(token: str, state: AuthState, clock: Callable[[], float] = time.time) -> Principal:
    """Return the token's principal or raise `TokenRejected` saying what was wrong (never echoing the token)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected("The API key is not a well-formed token.")
    try:
        header = _json_object(_segment(parts[0]))
        payload, signature = _segment(parts[1]), _segment(parts[2])
    except (ValueError, UnicodeError, binascii.Error) as exc:
        raise TokenRejected("The API key is not a well-formed token.") from exc
    if header.get("alg") != ALGORITHM:
        raise TokenRejected(f"The API key is signed with algorithm {header.get('alg')!r}; only EdDSA is accepted.")
    if "crit" in header:  # RFC 7515 4.1.11: extensions a recipient does not understand make the token invalid
        raise TokenRejected("The API key's header lists critical extensions (crit) that this server does not "
                            "support.")
    kid = header.get("kid")
    key = state.keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenRejected("The API key was signed by an unknown key (kid); it is not valid for this server.")
    try:
        key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise TokenRejected("The API key's signature does not verify.") from None
    try:
        claims = _json_object(payload)
    except ValueError:
        raise TokenRejected("The API key is invalid: Invalid payload string: must be a json object.") from None
    for name in REQUIRED_CLAIMS:
        if claims.get(name) is None:
            raise TokenRejected(f"The API key lacks the required claim {name!r}.")
    now = clock()
    issued_at = _integer_claim(claims, "iat", "Issued At")
    if issued_at > now + LEEWAY_SECONDS:
        raise TokenRejected("The API key is not valid yet (nbf/iat in the future).")
    not_before = _integer_claim(claims, "nbf", "Not Before")
    if not_before > now + LEEWAY_SECONDS:
        raise TokenRejected("The API key is not valid yet (nbf/iat in the future).")
    expires_at = _integer_claim(claims, "exp", "Expiration Time")
    if expires_at <= now - LEEWAY_SECONDS:
        raise TokenRejected("The API key has expired; use the rotated key from its Secret.")
    if not isinstance(claims["iss"], str) or claims["iss"] != state.issuer:
        raise TokenRejected("The API key was issued by an unknown issuer (iss).")
    audiences = claims["aud"]
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list) or state.audience not in audiences:
        raise TokenRejected("The API key was issued for another deployment (aud).")
    scope, uid, sub, jti, env = (claims.get(k) for k in ("scope", "uid", "sub", "jti", "env"))
    if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
        raise TokenRejected("The API key's scope claim must be a list of strings.")
    if not all(isinstance(v, str) and v for v in (uid, sub, jti)):
        raise TokenRejected("The API key's uid, sub and jti claims must be non-empty strings.")
    if env not in ENVIRONMENTS:
        raise TokenRejected(f"The API key's env claim must be one of {', '.join(ENVIRONMENTS)}.")
    principal = Principal(uid=str(uid), subject=str(sub), token_id=str(jti), scopes=frozenset(scope), env=str(env),
                          expires_at=expires_at, not_before=max(not_before, issued_at))
    if principal.token_id in state.revoked:
        raise TokenRejected("The API key has been revoked.", principal)
    return principal
