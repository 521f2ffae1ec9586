"""The limit arithmetic, as pure functions of stored times and `now` (the Redis Lua script mirrors it).

Requests: GCRA. Each request pushes the key's theoretical arrival time (TAT) by 1/rps; a request is admitted while
TAT - now stays within capacity/rps, so an idle key may send `capacity` requests at once, then `rps` per second.
Tokens: the same idea in "debt" form. A request is admitted while fewer than `tpm` tokens are outstanding in the
last minute, and reserves what it may use (prompt + max_tokens) at once; when it ends, the unused part is refunded.
So requests running in parallel cannot together overshoot the budget by more than one request's reservation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from deepseek_server.limits.policy import KeyLimits

TOKEN_WINDOW_S = 60.0
# How far past a bound a time may land and still count as on it. Times are seconds since an epoch (Redis's clock:
# about 1.8e9, where a double's step is 2.4e-7 s), so `(now + interval) - now` can come out a few tenths of a
# microsecond above `interval`: with a margin below that step, a key with `burst` 1 was refused on every request at
# most rates. A microsecond is nothing to a rate limit, and holds until the year 2242.
SLACK_S = 1e-6


class RequestCheck(NamedTuple):  # a tuple: built on every admission, where a frozen dataclass costs several times more
    allowed: bool
    new_tat: float
    retry_after_s: float


_new_tuple = tuple.__new__  # builds a RequestCheck without the Python-level __new__ NamedTuple generates


def check_request(tat: float | None, now: float, limits: KeyLimits) -> RequestCheck:
    """Admit one request against the GCRA state `tat`; returns the TAT to store if admitted."""
    start = tat if tat is not None and tat > now else now
    new_tat = start + limits.interval
    if new_tat - now > limits.tolerance + SLACK_S:
        return _new_tuple(RequestCheck, (False, start, new_tat - limits.tolerance - now))
    return _new_tuple(RequestCheck, (True, new_tat, 0.0))


def remaining_requests(tat: float | None, now: float, limits: KeyLimits) -> int:
    ahead = (tat or now) - now
    outstanding = ahead if ahead > 0.0 else 0.0
    remaining = math.floor((limits.tolerance - outstanding + SLACK_S) / limits.interval)
    return remaining if remaining > 0 else 0


def tokens_outstanding(token_tat: float | None, now: float) -> float:
    """Seconds of token budget in use: tokens_in_use * 60 / tpm."""
    return max((token_tat or now) - now, 0.0)


def check_tokens(token_tat: float | None, now: float, limits: KeyLimits) -> tuple[bool, float]:
    """(admitted, retry_after_s): admitted while at least one token of the minute's budget is free."""
    if limits.tpm is None:
        return True, 0.0
    per_token = TOKEN_WINDOW_S / limits.tpm
    outstanding = tokens_outstanding(token_tat, now)
    if outstanding > TOKEN_WINDOW_S - per_token + SLACK_S:
        return False, outstanding - (TOKEN_WINDOW_S - per_token)
    return True, 0.0


def rescale_token_tat(token_tat: float | None, stored_tpm: float | None, now: float, limits: KeyLimits
                      ) -> float | None:
    """A token TAT written under a budget of `stored_tpm`, read under `limits.tpm`: the tokens outstanding stay the
    same and drain at the new rate, so a raised (or lowered) limit applies from the next request on, instead of the
    old budget's seconds being read as tokens of the new one."""
    if (token_tat is None or not stored_tpm or limits.tpm is None or stored_tpm == limits.tpm
            or token_tat <= now):
        return token_tat
    return now + (token_tat - now) * stored_tpm / limits.tpm


def charge_tokens(token_tat: float | None, now: float, used: int, limits: KeyLimits) -> float | None:
    """The token TAT after `used` tokens were spent (negative: refunded, never below `now`)."""
    if limits.tpm is None:
        return token_tat
    return max(max(token_tat or now, now) + used * TOKEN_WINDOW_S / limits.tpm, now)


def remaining_tokens(token_tat: float | None, now: float, limits: KeyLimits) -> int | None:
    if limits.tpm is None:
        return None
    per_token = TOKEN_WINDOW_S / limits.tpm
    return max(int((TOKEN_WINDOW_S - tokens_outstanding(token_tat, now) + SLACK_S) / per_token), 0)
