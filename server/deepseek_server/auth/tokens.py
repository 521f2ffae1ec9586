"""Verify an API key (a JWT) against the loaded auth state, exactly as docs/auth-contract.md requires."""

from __future__ import annotations

from dataclasses import dataclass

import jwt

from deepseek_server.auth.documents import AuthState

ALGORITHM = "EdDSA"
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("iss", "aud", "sub", "scope", "env", "uid", "jti", "iat", "nbf", "exp")
ENVIRONMENTS = ("dev", "test", "prod")


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token."""

    uid: str
    subject: str
    token_id: str
    scopes: frozenset[str]
    env: str
    expires_at: int


class TokenRejected(Exception):
    """The token is not acceptable; `principal` is set when the token was genuine but revoked (for the audit)."""

    def __init__(self, message: str, principal: Principal | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.principal = principal


def verify_token(token: str, state: AuthState) -> Principal:
    """Return the token's principal or raise `TokenRejected` saying what was wrong (never echoing the token)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as exc:
        raise TokenRejected("The API key is not a well-formed token.") from exc
    if header.get("alg") != ALGORITHM:
        raise TokenRejected(f"The API key is signed with algorithm {header.get('alg')!r}; only EdDSA is accepted.")
    kid = header.get("kid")
    key = state.keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenRejected("The API key was signed by an unknown key (kid); it is not valid for this server.")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=state.audience,
            issuer=state.issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenRejected("The API key has expired; use the rotated key from its Secret.") from exc
    except jwt.ImmatureSignatureError as exc:
        raise TokenRejected("The API key is not valid yet (nbf/iat in the future).") from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenRejected("The API key was issued for another deployment (aud).") from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenRejected("The API key was issued by an unknown issuer (iss).") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRejected(f"The API key lacks the required claim {exc.claim!r}.") from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenRejected("The API key's signature does not verify.") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenRejected(f"The API key is invalid: {exc}.") from exc
    scope, uid, sub, jti, env = (claims.get(k) for k in ("scope", "uid", "sub", "jti", "env"))
    if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
        raise TokenRejected("The API key's scope claim must be a list of strings.")
    if not all(isinstance(v, str) and v for v in (uid, sub, jti)):
        raise TokenRejected("The API key's uid, sub and jti claims must be non-empty strings.")
    if env not in ENVIRONMENTS:
        raise TokenRejected(f"The API key's env claim must be one of {', '.join(ENVIRONMENTS)}.")
    principal = Principal(uid=str(uid), subject=str(sub), token_id=str(jti), scopes=frozenset(scope), env=str(env),
                          expires_at=int(claims["exp"]))
    if principal.token_id in state.revoked:
        raise TokenRejected("The API key has been revoked.", principal)
    return principal
