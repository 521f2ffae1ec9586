"""Audit records (one JSON object per API request, even rejected ones) and the per-key history they feed.

A record holds who (key uid, subject, token id), what (route, model, parameter fingerprint, token counts) and how it
went (status, error code, latency, cache). It never holds the token, and holds prompt text only when
`--audit-prompts` asks for a short preview.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)


class MemoryHistory:
    """The last `size` records of each key uid, in this process."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self._records: dict[str, deque[dict[str, Any]]] = defaultdict(lambda: deque(maxlen=self.size))

    async def add(self, uid: str, record: dict[str, Any]) -> None:
        self._records[uid].appendleft(record)

    async def recent(self, uid: str, limit: int) -> list[dict[str, Any]]:
        return list(self._records.get(uid, ()))[:limit]


class RedisHistory:
    """The last `size` records of each key uid in a Redis list shared by all replicas (kept 7 days)."""

    def __init__(self, client: Any, size: int = 100, prefix: str = "deepseek:history", ttl_s: int = 7 * 86400) -> None:
        self.client = client
        self.size = size
        self.prefix = prefix
        self.ttl_s = ttl_s

    async def add(self, uid: str, record: dict[str, Any]) -> None:
        key = f"{self.prefix}:{uid}"
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lpush(key, json.dumps(record))
                pipe.ltrim(key, 0, self.size - 1)
                pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except Exception as exc:
            log.warning("history: Redis write failed (%s); the audit log still has the record", exc)

    async def recent(self, uid: str, limit: int) -> list[dict[str, Any]]:
        raw = await self.client.lrange(f"{self.prefix}:{uid}", 0, limit - 1)
        return [json.loads(item) for item in raw]


class AuditLog:
    """Writes records as JSON lines (to a file or stdout) and adds them to the caller's history."""

    def __init__(self, history: MemoryHistory | RedisHistory, path: Path | None = None) -> None:
        self.history = history
        self.path = path
        self._lock = threading.Lock()
        self._out: TextIO | None = None

    def _stream(self) -> TextIO:
        if self._out is None:
            self._out = open(self.path, "a", buffering=1, encoding="utf-8") if self.path else sys.stdout  # noqa: SIM115
        return self._out

    async def record(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            out = self._stream()
            out.write(line + "\n")
            if self.path is None:
                out.flush()
        uid = record.get("key_uid")
        if uid:
            await self.history.add(uid, record)

    def close(self) -> None:
        with self._lock:
            if self.path is not None and self._out is not None:
                self._out.close()
            self._out = None
