"""The limiter the API uses: Redis when configured, this process's memory otherwise.

When Redis is unreachable the limiter **falls back to per-replica limits in memory** rather than failing closed:
every replica keeps enforcing the key's limits on its own, so with N replicas a key may get up to N times its limit
until Redis answers again, while the service stays up. Each fallback is counted in
`deepseek_ratelimit_backend_errors_total`, logged (at most every 10 s), and marked on responses with the header
`x-ratelimit-backend: memory-fallback`. Redis is retried after `retry_redis_after_s` seconds, so an outage costs one
connect timeout per period, not one per request.

A request reserves prompt + max_tokens of its key's tokens-per-minute budget at admission (`reserve_tokens`) and
refunds the unused part at release. A Redis `parallel` slot is a short lease that a background task renews while the
request runs. With limits in memory, release is a plain function call (`release_now`): nothing to await, so nothing
to shield from cancellation.

An admission or a release can run in Redis while its answer never arrives (a reply slower than the Redis timeout, a
request cancelled while it waits): the slot would then stay taken, with its reservation, until its lease ran out. The
limiter names each slot itself, so it frees such a slot in the background once Redis answers again, and settles its
tokens then; only a slot still taken is settled, so an admission that never ran, or a release that did, changes
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from deepseek_server.limits import gcra
from deepseek_server.limits.decision import Decision
from deepseek_server.limits.memory_store import MemoryLimitStore
from deepseek_server.limits.policy import KeyLimits
from deepseek_server.limits.redis_store import RedisLimitStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    """An admitted request; hand it back to `release` with the tokens it used."""

    uid: str
    limits: KeyLimits
    decision: Decision
    reserved: int = 0
    renewal: asyncio.Task[None] | None = None
    admitted_at: float = field(default_factory=time.monotonic)

    def settled_reservation(self, tokens_used: int) -> int:
        """The reservation to settle `tokens_used` against: all of it, less what of its unused part the minute has
        drained already. A request that ran longer than its reservation took to drain (a minute for a whole budget)
        gets back only what is still outstanding: refunding the rest would cancel other requests' newer
        reservations, and requests in parallel could then overshoot by more than one reservation. The key's debt
        drains oldest first: what it owed when this request was admitted drains before this reservation does."""
        reserved, tpm = self.reserved, self.limits.tpm
        if tokens_used >= reserved or tpm is None:
            return reserved
        rate = tpm / gcra.TOKEN_WINDOW_S  # tokens drained per second
        owed_before = self.decision.reset_tokens_s * rate - reserved  # the key's debt ahead of this reservation
        drained = (time.monotonic() - self.admitted_at) * rate - (owed_before if owed_before > 0 else 0)
        outstanding = reserved - (drained if drained > 0 else 0)
        refund = min(reserved - tokens_used, math.ceil(outstanding) if outstanding > 0 else 0)
        return tokens_used + refund

    @property
    def needs_io(self) -> bool:
        """Whether releasing it talks to Redis (then the caller must let the release finish when cancelled)."""
        return self.decision.allowed and self.decision.backend == "redis"


class RateLimiter:
    def __init__(self, redis_store: RedisLimitStore | None = None, retry_redis_after_s: float = 5.0,
                 on_backend_error: Any = None) -> None:
        self.memory = MemoryLimitStore()
        self.redis = redis_store
        self.retry_redis_after_s = retry_redis_after_s
        self.on_backend_error = on_backend_error
        self._redis_down_until = 0.0
        self._last_log = 0.0
        self._settling: set[asyncio.Task[None]] = set()  # slots whose admission or release lost its answer

    def _redis_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._redis_down_until = now + self.retry_redis_after_s
        if self.on_backend_error is not None:
            self.on_backend_error()
        if now - self._last_log > 10:
            self._last_log = now
            log.warning("rate limits: Redis unreachable (%s); enforcing per-replica limits in memory", exc)

    async def acquire(self, uid: str, limits: KeyLimits, reserve_tokens: int = 0, hold: bool = True) -> Lease:
        """Admit one request of `uid`, reserving `reserve_tokens` (prompt + max_tokens) of its token budget.

        `hold=False` admits a request that is answered at once (from the cache): it counts against the request
        rate and is refused when the parallel slots are full, but takes no slot, so it has nothing to release."""
        reserve = reserve_tokens if limits.tpm is not None else 0
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            holds_slot = hold and limits.parallel is not None
            lease_id = uuid.uuid4().hex
            try:
                decision = await self.redis.acquire(uid, limits, reserve, hold, lease_id=lease_id)
            except asyncio.CancelledError:
                if holds_slot:  # the admission may have run: its slot and reservation are freed once Redis answers
                    self._settle_later(uid, limits, lease_id, 0, reserve)
                raise
            except Exception as exc:  # redis.RedisError, OSError, timeouts: all mean "unreachable"
                self._redis_failed(exc)
                if holds_slot:
                    self._settle_later(uid, limits, lease_id, 0, reserve)
            else:
                lease = Lease(uid, limits, decision, reserve if decision.allowed else 0)
                if decision.allowed and holds_slot:
                    lease.renewal = asyncio.get_running_loop().create_task(self._renew(lease))
                return lease
        decision = self.memory.acquire(uid, limits, reserve, hold)
        if self.redis is not None:
            decision = decision._replace(extra_headers={"x-ratelimit-backend": "memory-fallback"})
        return Lease(uid, limits, decision, reserve if decision.allowed else 0)

    def acquire_now(self, uid: str, limits: KeyLimits, reserve_tokens: int = 0, hold: bool = True) -> Lease:
        """`acquire` for a limiter without Redis (`redis is None`): limits in memory, nothing to await."""
        assert self.redis is None
        reserve = reserve_tokens if limits.tpm is not None else 0
        decision = self.memory.acquire(uid, limits, reserve, hold)
        return Lease(uid, limits, decision, reserve if decision.allowed else 0)

    async def _renew(self, lease: Lease) -> None:
        """Keep the lease's parallel slot while its request runs; a failed renewal is retried next period."""
        assert self.redis is not None
        while True:
            await asyncio.sleep(self.redis.renew_every_s)
            try:
                if not await self.redis.renew(lease.uid, lease.decision.lease_id):
                    log.warning("rate limits: a parallel-request lease of %s expired before renewal", lease.uid)
                    return
            except Exception as exc:
                self._redis_failed(exc)

    def release_now(self, lease: Lease, tokens_used: int) -> bool:
        """Release a lease that needs no I/O (see `Lease.needs_io`): True when done, False for one that `release`
        must free in Redis."""
        decision = lease.decision
        if not decision.allowed:
            return True
        if decision.backend == "memory":
            self.memory.release(lease.uid, lease.limits, tokens_used, lease.settled_reservation(tokens_used))
            return True
        return False

    async def release(self, lease: Lease, tokens_used: int) -> None:
        """End an admitted request: stop renewing its slot, free it, and settle its tokens against the reservation."""
        if lease.renewal is not None:
            lease.renewal.cancel()
            lease.renewal = None
        if not lease.needs_io:
            self.release_now(lease, tokens_used)
            return
        assert self.redis is not None
        reserved = lease.settled_reservation(tokens_used)
        try:
            await self.redis.release(lease.uid, lease.limits, lease.decision.lease_id, tokens_used, reserved)
        except Exception as exc:
            self._redis_failed(exc)
            if lease.limits.parallel is not None:  # settled later if it did not run (a slot tells whether it did)
                self._settle_later(lease.uid, lease.limits, lease.decision.lease_id, tokens_used, reserved)

    def _settle_later(self, uid: str, limits: KeyLimits, lease_id: str, tokens_used: int, reserved: int) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(uid, limits, lease_id, tokens_used, reserved))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, uid: str, limits: KeyLimits, lease_id: str, tokens_used: int, reserved: int) -> None:
        """Release a slot whose admission or release may have run in Redis without its answer arriving: once Redis
        answers again, and only if the slot is still taken. Tried every `retry_redis_after_s` (the first wait also
        lets a late admission run before this) until the slot's lease has run out anyway."""
        assert self.redis is not None
        give_up = time.monotonic() + self.redis.lease_s + self.retry_redis_after_s
        while True:
            await asyncio.sleep(self.retry_redis_after_s)
            try:
                await self.redis.release(uid, limits, lease_id, tokens_used, reserved, only_if_held=True)
                return
            except Exception as exc:
                if time.monotonic() >= give_up:
                    log.warning("rate limits: could not free a parallel slot of %s whose answer was lost (%s); "
                                "its lease has run out", uid, exc)
                    return
