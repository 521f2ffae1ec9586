"""Response cache for deterministic requests (temperature 0 or a seed): local LRU plus Redis when configured."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)


def request_fingerprint(route: str, body: dict[str, Any]) -> str:
    """A stable hash of what determines the answer: route, model, prompt/messages and sampling parameters."""
    relevant = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "user")}
    canonical = json.dumps({"route": route, "body": relevant}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_deterministic(temperature: float | None, seed: int | None) -> bool:
    return (temperature is not None and temperature == 0.0) or seed is not None


class ResponseCache:
    """`get`/`put` of response bodies by fingerprint; Redis errors count as misses and never fail a request."""

    def __init__(self, ttl_s: int, max_entries: int = 1024, redis: Any = None, prefix: str = "deepseek:cache") -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.redis = redis
        self.prefix = prefix
        self._local: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    async def get(self, fingerprint: str) -> dict[str, Any] | None:
        entry = self._local.get(fingerprint)
        if entry is not None:
            expires, body = entry
            if expires > time.monotonic():
                self._local.move_to_end(fingerprint)
                return body
            del self._local[fingerprint]
        if self.redis is None:
            return None
        try:
            raw = await self.redis.get(f"{self.prefix}:{fingerprint}")
        except Exception as exc:
            log.warning("response cache: Redis get failed (%s); treating as a miss", exc)
            return None
        if raw is None:
            return None
        body = json.loads(raw)
        self._remember(fingerprint, body)
        return body

    async def put(self, fingerprint: str, body: dict[str, Any]) -> None:
        self._remember(fingerprint, body)
        if self.redis is not None:
            try:
                await self.redis.set(f"{self.prefix}:{fingerprint}", json.dumps(body), ex=self.ttl_s)
            except Exception as exc:
                log.warning("response cache: Redis set failed (%s)", exc)

    def _remember(self, fingerprint: str, body: dict[str, Any]) -> None:
        self._local[fingerprint] = (time.monotonic() + self.ttl_s, body)
        self._local.move_to_end(fingerprint)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)
