"""Rate-limit state in this process (one replica, or the fallback while Redis is unreachable)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from deepseek_server.limits import gcra
from deepseek_server.limits.decision import RESET_REQUESTS_HEADERS, Decision, request_rate_headers
from deepseek_server.limits.gcra import SLACK_S
from deepseek_server.limits.policy import KeyLimits

_new_tuple = tuple.__new__  # builds a Decision without the Python-level __new__ NamedTuple generates


class MemoryLimitStore:
    """GCRA request and token state plus parallel counters per key uid.

    Used from the event loop only, and no method awaits: each check-and-update runs whole, so it needs no lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._request_tat: dict[str, float] = {}
        # uid -> (token TAT, the tpm it was written under: see gcra.rescale_token_tat)
        self._token_tat: dict[str, tuple[float, int]] = {}
        self._in_flight: dict[str, int] = {}

    def acquire(self, uid: str, limits: KeyLimits, reserve_tokens: int = 0, hold: bool = True) -> Decision:
        """Admit one request and reserve `reserve_tokens` of its tokens-per-minute budget (`hold=False`: answered at
        once, no parallel slot taken). As in Redis, requests are counted in flight only for keys with a `parallel`
        limit."""
        now = self.clock()
        tat = self._request_tat.get(uid)
        request_allowed, new_tat, request_retry = gcra.check_request(tat, now, limits)
        allowed, kind, retry_after_s = False, None, 0.0
        metered = limits.tpm is not None  # without a token budget there is no token state to check or report
        remaining_tokens, reset_tokens_s = None, 0.0
        token_tat = tokens_ok = tokens_retry = None
        if metered:
            stored = self._token_tat.get(uid)
            token_tat = gcra.rescale_token_tat(stored[0], stored[1], now, limits) if stored is not None else None
            tokens_ok, tokens_retry = gcra.check_tokens(token_tat, now, limits)
            remaining_tokens = gcra.remaining_tokens(token_tat, now, limits)
            reset_tokens_s = gcra.tokens_outstanding(token_tat, now)
        if not request_allowed:
            kind, retry_after_s = "requests", request_retry
        elif metered and not tokens_ok:
            kind, retry_after_s = "tokens", tokens_retry
        elif limits.parallel is not None and self._in_flight.get(uid, 0) >= limits.parallel:
            kind, retry_after_s = "parallel", 1.0
        else:
            allowed = True
            self._request_tat[uid] = tat = new_tat
            if hold and limits.parallel is not None:
                self._in_flight[uid] = self._in_flight.get(uid, 0) + 1
            if metered and reserve_tokens:
                reserved_tat = gcra.charge_tokens(token_tat, now, reserve_tokens, limits)
                if reserved_tat is not None:
                    self._token_tat[uid] = (reserved_tat, limits.tpm)  # type: ignore[assignment]
                    remaining_tokens = gcra.remaining_tokens(reserved_tat, now, limits)
                    reset_tokens_s = gcra.tokens_outstanding(reserved_tat, now)
        ahead = (tat or now) - now
        return _new_tuple(Decision, (allowed, limits, kind, retry_after_s, gcra.remaining_requests(tat, now, limits),
                                     ahead if ahead > 0.0 else 0.0, remaining_tokens, reset_tokens_s, "memory", "",
                                     None))

    def admit_request(self, uid: str, limits: KeyLimits) -> list[tuple[bytes, bytes]] | None:
        """`acquire` for a key whose only limit is its request rate (no `tpm`, no `parallel`: nothing is held, so
        nothing is released): the admitted request's rate-limit headers, or None when the rate refuses it (`acquire`
        then says for how long). The common case, so it builds no Decision."""
        now = self.clock()
        tat = self._request_tat.get(uid)
        interval, tolerance = limits.interval, limits.tolerance
        new_tat = (tat if tat is not None and tat > now else now) + interval
        ahead = new_tat - now
        if ahead > tolerance + SLACK_S:  # as gcra.check_request decides
            return None
        self._request_tat[uid] = new_tat
        remaining = int((tolerance - ahead + SLACK_S) / interval)  # what gcra.remaining_requests says after it
        if remaining < 0:
            remaining = 0
        if ahead < 1:  # a reset under a second, the common case: `request_rate_headers`, written out (a call less)
            return [limits.limit_requests_header, (b"x-ratelimit-remaining-requests", b"%d" % remaining),
                    RESET_REQUESTS_HEADERS[math.ceil(ahead * 1000)]]
        return request_rate_headers(limits, remaining, ahead)

    def release(self, uid: str, limits: KeyLimits, tokens_used: int, reserved: int = 0) -> None:
        """End one request: charge what it used beyond its reservation, or refund the unused rest."""
        if limits.parallel is not None:  # counted when admitted
            in_flight = self._in_flight.get(uid, 0)
            self._in_flight[uid] = in_flight - 1 if in_flight > 0 else 0
        if tokens_used != reserved and limits.tpm is not None:
            now = self.clock()
            stored = self._token_tat.get(uid)
            token_tat = gcra.rescale_token_tat(stored[0], stored[1], now, limits) if stored is not None else None
            charged = gcra.charge_tokens(token_tat, now, tokens_used - reserved, limits)
            if charged is not None:
                self._token_tat[uid] = (charged, limits.tpm)
