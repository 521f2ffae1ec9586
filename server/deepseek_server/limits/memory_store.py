"""Rate-limit state in this process (one replica, or the fallback while Redis is unreachable)."""

from __future__ import annotations

import time
from collections.abc import Callable

from deepseek_server.limits import gcra
from deepseek_server.limits.decision import Decision
from deepseek_server.limits.policy import KeyLimits


class MemoryLimitStore:
    """GCRA request and token state plus parallel counters per key uid.

    Used from the event loop only, and no method awaits: each check-and-update runs whole, so it needs no lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._request_tat: dict[str, float] = {}
        self._token_tat: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}

    def acquire(self, uid: str, limits: KeyLimits, reserve_tokens: int = 0, hold: bool = True) -> Decision:
        """Admit one request and reserve `reserve_tokens` of its tokens-per-minute budget (`hold=False`: answered at
        once, no parallel slot taken)."""
        now = self.clock()
        tat = self._request_tat.get(uid)
        request = gcra.check_request(tat, now, limits)
        decision = Decision(allowed=False, limits=limits, backend="memory")
        metered = limits.tpm is not None  # without a token budget there is no token state to check or report
        token_tat = self._token_tat.get(uid) if metered else None
        tokens_ok, tokens_retry = gcra.check_tokens(token_tat, now, limits) if metered else (True, 0.0)
        if metered:
            decision.remaining_tokens = gcra.remaining_tokens(token_tat, now, limits)
            decision.reset_tokens_s = gcra.tokens_outstanding(token_tat, now)
        if not request.allowed:
            decision.kind, decision.retry_after_s = "requests", request.retry_after_s
        elif not tokens_ok:
            decision.kind, decision.retry_after_s = "tokens", tokens_retry
        elif limits.parallel is not None and self._in_flight.get(uid, 0) >= limits.parallel:
            decision.kind, decision.retry_after_s = "parallel", 1.0
        else:
            decision.allowed = True
            self._request_tat[uid] = tat = request.new_tat
            if hold:
                self._in_flight[uid] = self._in_flight.get(uid, 0) + 1
            reserved_tat = (gcra.charge_tokens(token_tat, now, reserve_tokens, limits)
                            if metered and reserve_tokens else None)
            if reserved_tat is not None:
                self._token_tat[uid] = reserved_tat
                decision.remaining_tokens = gcra.remaining_tokens(reserved_tat, now, limits)
                decision.reset_tokens_s = gcra.tokens_outstanding(reserved_tat, now)
        decision.remaining_requests = gcra.remaining_requests(tat, now, limits)
        decision.reset_requests_s = max((tat or now) - now, 0.0)
        return decision

    def release(self, uid: str, limits: KeyLimits, tokens_used: int, reserved: int = 0) -> None:
        """End one request: charge what it used beyond its reservation, or refund the unused rest."""
        self._in_flight[uid] = max(self._in_flight.get(uid, 0) - 1, 0)
        if tokens_used != reserved:
            charged = gcra.charge_tokens(self._token_tat.get(uid), self.clock(), tokens_used - reserved, limits)
            if charged is not None:
                self._token_tat[uid] = charged
