"""The limiter the API uses: Redis when configured, this process's memory otherwise.

When Redis is unreachable the limiter **falls back to per-replica limits in memory** rather than failing closed:
every replica keeps enforcing the key's limits on its own, so with N replicas a key may get up to N times its limit
until Redis answers again, while the service stays up. Each fallback is counted in
`deepseek_ratelimit_backend_errors_total`, logged (at most every 10 s), and marked on responses with the header
`x-ratelimit-backend: memory-fallback`. Redis is retried after `retry_redis_after_s` seconds, so an outage costs one
connect timeout per period, not one per request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from deepseek_server.limits.decision import Decision
from deepseek_server.limits.memory_store import MemoryLimitStore
from deepseek_server.limits.policy import KeyLimits
from deepseek_server.limits.redis_store import RedisLimitStore

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """An admitted request; hand it back to `release` with the tokens it used."""

    uid: str
    limits: KeyLimits
    decision: Decision


class RateLimiter:
    def __init__(self, redis_store: RedisLimitStore | None = None, retry_redis_after_s: float = 5.0,
                 on_backend_error: Any = None) -> None:
        self.memory = MemoryLimitStore()
        self.redis = redis_store
        self.retry_redis_after_s = retry_redis_after_s
        self.on_backend_error = on_backend_error
        self._redis_down_until = 0.0
        self._last_log = 0.0

    def _redis_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._redis_down_until = now + self.retry_redis_after_s
        if self.on_backend_error is not None:
            self.on_backend_error()
        if now - self._last_log > 10:
            self._last_log = now
            log.warning("rate limits: Redis unreachable (%s); enforcing per-replica limits in memory", exc)

    async def acquire(self, uid: str, limits: KeyLimits) -> Lease:
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                return Lease(uid, limits, await self.redis.acquire(uid, limits))
            except Exception as exc:  # redis.RedisError, OSError, timeouts: all mean "unreachable"
                self._redis_failed(exc)
        decision = self.memory.acquire(uid, limits)
        if self.redis is not None:
            decision.extra_headers["x-ratelimit-backend"] = "memory-fallback"
        return Lease(uid, limits, decision)

    async def release(self, lease: Lease, tokens_used: int) -> None:
        if not lease.decision.allowed:
            return
        if lease.decision.backend == "redis" and self.redis is not None:
            try:
                await self.redis.release(lease.uid, lease.limits, lease.decision.lease_id, tokens_used)
            except Exception as exc:
                self._redis_failed(exc)
            return
        self.memory.release(lease.uid, lease.limits, tokens_used)
