"""Response cache for deterministic requests (temperature 0 or a seed): local LRU plus Redis when configured.

Entries are keyed by an HMAC (`RequestKeys.cache_key`) of the deployment, the model revision, the caller's
environment, the caller's key (its ApiKey uid) and the request. So a new revision or another deployment sharing the
Redis never serves these answers, and an answer is only ever served to the key that caused it: `x-cache: hit` tells
a caller nothing about other keys' requests. Keys of one ApiKey share entries across its rotated tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

from deepseek_server.auth.tokens import Principal
from deepseek_server.request_keys import RequestKeys

log = logging.getLogger(__name__)


def is_deterministic(temperature: float | None, seed: int | None) -> bool:
    return (temperature is not None and temperature == 0.0) or seed is not None


class ResponseCache:
    """`get`/`put` of response bodies per (caller, request); Redis errors count as misses and never fail a request.
    After one, Redis is left alone for `retry_redis_after_s` (as the rate limiter does): an unreachable Redis would
    otherwise make every cacheable request wait out its timeout, twice, and log a warning each time."""

    def __init__(self, ttl_s: int, keys: RequestKeys, max_entries: int = 1024, redis: Any = None,
                 prefix: str = "deepseek:cache", retry_redis_after_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self.keys = keys
        self.max_entries = max_entries
        self.redis = redis
        self.prefix = prefix
        self.retry_redis_after_s = retry_redis_after_s
        self._redis_down_until = 0.0
        self._local: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, what: str, exc: Exception) -> None:
        self._redis_down_until = time.monotonic() + self.retry_redis_after_s
        log.warning("response cache: Redis %s failed (%s); local entries only for %g s", what, exc,
                    self.retry_redis_after_s)

    def key(self, fingerprint: str, principal: Principal) -> str:
        return self.keys.cache_key(fingerprint, principal.env, f"key:{principal.uid}")

    async def get(self, fingerprint: str, principal: Principal) -> dict[str, Any] | None:
        key = self.key(fingerprint, principal)
        entry = self._local.get(key)
        if entry is not None:
            expires, body = entry
            if expires > time.monotonic():
                self._local.move_to_end(key)
                return body
            del self._local[key]
        if not self._redis_usable():
            return None
        try:
            # the entry and how long it has left, in one round trip: the local copy expires when the shared one does
            # (with a full TTL of its own it could be served up to twice `ttl_s` after it was generated)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(f"{self.prefix}:{key}")
                pipe.pttl(f"{self.prefix}:{key}")
                raw, left_ms = await pipe.execute()
        except Exception as exc:
            self._redis_failed("get", exc)  # a miss
            return None
        if raw is None:
            return None
        body = json.loads(raw)
        if isinstance(left_ms, int) and left_ms > 0:
            self._remember(key, body, min(self.ttl_s, left_ms / 1000))
        elif left_ms != -2:  # -2: gone since the GET, so not kept; -1 (no expiry: not written by this server)
            self._remember(key, body)
        return body

    async def put(self, fingerprint: str, body: dict[str, Any], principal: Principal) -> None:
        """Store `body` for `principal`'s key (an entry belongs to one caller, as `get` reads it)."""
        key = self.key(fingerprint, principal)
        self._remember(key, body)
        if self._redis_usable():
            try:
                await self.redis.set(f"{self.prefix}:{key}", json.dumps(body), ex=self.ttl_s)
            except Exception as exc:
                self._redis_failed("set", exc)

    def _remember(self, key: str, body: dict[str, Any], ttl_s: float | None = None) -> None:
        self._local[key] = (time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s), body)
        self._local.move_to_end(key)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)
