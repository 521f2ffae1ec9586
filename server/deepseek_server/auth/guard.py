"""The request-side of auth: hold the current AuthState, check a request's bearer token and scope."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from deepseek_server.auth.documents import AuthState
from deepseek_server.auth.tokens import LEEWAY_SECONDS, Principal, TokenRejected, verify_token
from deepseek_server.errors import APIError
from deepseek_server.limits.policy import UNLIMITED, KeyLimits

log = logging.getLogger(__name__)

SCOPE_PREDICT = "model:predict"
SCOPE_HISTORY = "history:read"
ANONYMOUS = Principal(uid="anonymous", subject="anonymous", token_id="-", scopes=frozenset({SCOPE_PREDICT,
                      SCOPE_HISTORY}), env="dev", expires_at=0)


VERIFIED_CACHE_SIZE = 10_000


class Authenticator:
    """Swapped atomically by the auth source thread; read by request handlers.

    A verification (cache miss) costs ~0.1 ms, most of it Ed25519, so tokens that verified under the *current* auth
    state are remembered (bounded). A hit still re-checks expiry and revocation on every request; a new auth state
    forgets them all.
    """

    def __init__(self, disabled: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.disabled = disabled
        self.state: AuthState | None = None
        self.clock = clock
        self._verified: dict[str, tuple[AuthState, Principal, int]] = {}

    @property
    def loaded(self) -> bool:
        return self.disabled or self.state is not None

    def set_state(self, state: AuthState) -> None:
        self.state = state
        self._verified = {}

    def _verify(self, authorization: str, state: AuthState) -> Principal:
        """The principal of a non-empty Authorization header; remembered by the header as sent, so a hit neither
        parses nor verifies it again."""
        cached = self._verified.get(authorization)
        now = self.clock()
        if cached is not None and cached[0] is state:
            _, principal, not_before = cached
            # The same instants as `verify_token`: valid from `nbf - 30` up to, not including, `exp + 30`.
            if not_before - LEEWAY_SECONDS <= now < principal.expires_at + LEEWAY_SECONDS:
                if principal.token_id in state.revoked:
                    raise TokenRejected("The API key has been revoked.", principal)
                return principal
            del self._verified[authorization]
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise APIError(401, "The Authorization header must be 'Bearer <key>'.", code="invalid_api_key")
        principal = verify_token(token.strip(), state, self.clock)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[authorization] = (state, principal, principal.not_before)
        return principal

    def limits_for(self, principal: Principal) -> KeyLimits:
        if self.disabled or self.state is None:
            return UNLIMITED
        return self.state.limits_for(principal.uid)

    def authenticate(self, authorization: str | None, scope: str | None) -> Principal:
        """The verified principal, or an APIError 401 (no/bad key), 403 (missing scope), 503 (no auth state yet)."""
        if self.disabled:
            return ANONYMOUS
        state = self.state
        if state is None:
            raise APIError(503, "The server has not loaded its auth configuration yet; retry shortly.",
                           type="server_error", code="auth_not_loaded", headers={"retry-after": "1"})
        if not authorization:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="missing_api_key")
        try:
            principal = self._verify(authorization, state)
        except TokenRejected as exc:
            raise RejectedKey(exc) from None
        if scope is not None and scope not in principal.scopes:
            raise ScopeMissing(principal, scope)
        return principal


class RejectedKey(APIError):
    def __init__(self, rejected: TokenRejected) -> None:
        super().__init__(401, f"Incorrect API key provided: {rejected.message}", code="invalid_api_key")
        self.principal = rejected.principal


class ScopeMissing(APIError):
    def __init__(self, principal: Principal, scope: str) -> None:
        super().__init__(403, f"The API key lacks the scope '{scope}' needed for this operation.",
                         type="permission_error", code="insufficient_scope")
        self.principal = principal
