"""Audit records (one JSON object per API request, even rejected ones) and the per-key history they feed.

A record holds who (key uid, subject, token id), what (route, model, keyed request fingerprint, token counts) and how
it went (status, error code, latency, cache). It never holds the token, and holds prompt text only when
`--audit-prompts` asks for a short preview, masked (`deepseek_server.redaction`) before it is recorded.

Records are queued by the request (no I/O on its path) and written by one background task in batches: the JSON
lines are encoded (orjson: a tenth of the standard library's cost per record) and written to the file in a worker
thread, and a batch's history entries go to Redis in one pipeline. Writes start at least `BATCH_GATHER_S` apart
(unless a full batch waits or a reader flushes), so records that arrive while a batch is being written wait for the
next batch instead of following it one or two at a time. A request queues only the parts of its record
(`record_later`); the worker thread builds the records of a batch together (their timestamps, keyed fingerprints and
masked previews), off the event loop that answers requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson

log = logging.getLogger(__name__)

BATCH_MAX = 512
# Under load the writer starts one write at most every this long, so that one write (one hop to the worker thread,
# one Redis pipeline) carries the records of many requests: at 10 ms a server answering a few hundred requests a second
# paid a thread hop for every few requests. A record after a quiet spell is written at once; readers of the history
# flush, which ends the wait.
BATCH_GATHER_S = 0.05


def _end_wait(waiting: asyncio.Future[None]) -> None:
    if not waiting.done():
        waiting.set_result(None)


def encode_record(record: dict[str, Any]) -> bytes:
    """One record as compact UTF-8 JSON (what `json.dumps(record, separators=(",", ":"), ensure_ascii=False)`
    writes); a value orjson refuses (an integer beyond 64 bits) falls back to the standard library."""
    try:
        return orjson.dumps(record)
    except TypeError:
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


class MemoryHistory:
    """The last `size` records of each key uid, in this process."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self._records: dict[str, deque[dict[str, Any]]] = defaultdict(lambda: deque(maxlen=self.size))

    async def add(self, uid: str, record: dict[str, Any]) -> None:
        self.add_now(uid, record)

    def add_now(self, uid: str, record: dict[str, Any]) -> None:
        self._records[uid].appendleft(record)

    def add_records(self, records: list[dict[str, Any]]) -> None:
        """Keep each record under its key uid (records of no key are not kept)."""
        kept = self._records
        for record in records:
            uid = record.get("key_uid")
            if uid:
                kept[str(uid)].appendleft(record)

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
        await self.add_many([(uid, encode_record(record))])

    async def add_many(self, entries: list[tuple[str, bytes]]) -> None:
        """Append (uid, record JSON) pairs in one round trip."""
        if not entries:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for uid, line in entries:
                    key = f"{self.prefix}:{uid}"
                    pipe.lpush(key, line)
                    pipe.ltrim(key, 0, self.size - 1)
                    pipe.expire(key, self.ttl_s)
                await pipe.execute()
        except Exception as exc:
            log.warning("history: Redis write of %d record(s) failed (%s); the audit log still has them",
                        len(entries), exc)

    async def recent(self, uid: str, limit: int) -> list[dict[str, Any]]:
        raw = await self.client.lrange(f"{self.prefix}:{uid}", 0, limit - 1)
        return [orjson.loads(item) for item in raw]


class AuditLog:
    """Queues records; a background task writes them as JSON lines (to a file or stdout) and to the history."""

    def __init__(self, history: MemoryHistory | RedisHistory, path: Path | None = None) -> None:
        self.history = history
        self.path = path
        self._out: BinaryIO | TextIO | None = None
        self._pending: list[dict[str, Any] | tuple[Any, ...]] = []
        self._queued = 0  # records queued so far
        self._written = 0  # records written so far
        self._wake: asyncio.Event | None = None
        self._woken = False  # whether `_wake` is set
        self._progress: asyncio.Condition | None = None
        self._writer: asyncio.Task[None] | None = None
        self._gathering: asyncio.Future[None] | None = None  # the writer's wait for more records, ended by flush
        self._flushing = 0  # callers waiting in flush: the writer does not wait for more records meanwhile

    def _stream(self) -> BinaryIO | TextIO:
        """The file (opened for appending bytes), or stdout's bytes underneath its text layer where it has one."""
        if self._out is None:
            self._out = (open(self.path, "ab") if self.path  # noqa: SIM115
                         else getattr(sys.stdout, "buffer", None) or sys.stdout)
        return self._out

    def record(self, record: dict[str, Any]) -> None:
        """Queue one record (call on the event loop; returns at once)."""
        self.record_later(record)

    def record_later(self, parts: dict[str, Any] | tuple[Any, ...]) -> None:
        """Queue the record that `parts[0](*parts[1:])` builds (or a record as it is); the writer builds it, off the
        event loop. What the parts refer to must not change once queued."""
        self._pending.append(parts)
        self._queued += 1
        if self._writer is None or self._writer.done():
            self._wake = asyncio.Event()
            self._woken = False
            self._progress = asyncio.Condition()
            self._writer = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")
        if not self._woken:  # `_wake.is_set()`, without a call per record
            self._woken = True
            assert self._wake is not None
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None and self._progress is not None
        last_write = -BATCH_GATHER_S
        while True:
            await self._wake.wait()
            # Records that came while the last batch was written wait with the ones still coming for the rest of the
            # gathering time: written at once, they would follow every batch one or two at a time, and the slower the
            # writes (a busy machine), the smaller the batches and the more each record would cost.
            wait = last_write + BATCH_GATHER_S - time.monotonic()
            if wait > 0 and len(self._pending) < BATCH_MAX and not self._flushing:
                await self._gather(wait)
            self._wake.clear()
            self._woken = False
            last_write = time.monotonic()
            batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
            if self._pending:
                self._woken = True
                self._wake.set()  # the rest goes in the next batch
            await self._write(batch)
            self._written += len(batch)
            if self._flushing:  # readers wait for it (nothing else does)
                async with self._progress:
                    self._progress.notify_all()

    async def _gather(self, seconds: float) -> None:
        """Wait `seconds` for more records, or until a reader flushes."""
        loop = asyncio.get_running_loop()
        self._gathering = gathering = loop.create_future()
        timer = loop.call_later(seconds, _end_wait, gathering)
        try:
            await gathering
        finally:
            timer.cancel()
            self._gathering = None

    async def _write(self, batch: list[dict[str, Any] | tuple[Any, ...]]) -> None:
        try:
            # the loop's executor without asyncio.to_thread's context copy: the writer needs no context variables
            records, lines, failure = await asyncio.get_running_loop().run_in_executor(None, self._write_lines,
                                                                                         batch)
        except Exception as exc:  # a record that cannot be built: the rest of the server goes on
            log.error("audit: building %d record(s) failed: %s", len(batch), exc)
            return
        if failure is not None:  # a full disk must not stop the server; the next batch tries again
            log.error("audit: writing %d record(s) failed: %s", len(batch), failure)
        await self._add_history(records, lines)

    def _add_memory_history(self, records: list[dict[str, Any]]) -> None:
        if isinstance(self.history, MemoryHistory):
            self.history.add_records(records)

    async def _add_history(self, records: list[dict[str, Any]], lines: list[bytes]) -> None:
        if isinstance(self.history, MemoryHistory):
            self._add_memory_history(records)
        else:
            await self.history.add_many([(str(record["key_uid"]), line)
                                         for record, line in zip(records, lines, strict=True) if record.get("key_uid")])

    def _write_lines(self, batch: list[dict[str, Any] | tuple[Any, ...]]
                     ) -> tuple[list[dict[str, Any]], list[bytes], Exception | None]:
        """Build (where queued as parts), encode and write a batch: (records, lines, the write's error if any)."""
        records = [item if isinstance(item, dict) else item[0](*item[1:]) for item in batch]
        try:
            lines = [orjson.dumps(record) for record in records]
        except TypeError:  # a value orjson refuses: the batch again, record by record, with the fallback
            lines = [encode_record(record) for record in records]
        if not lines:
            return records, lines, None
        try:
            out = self._stream()
            data = b"\n".join(lines) + b"\n"
            out.write(data if isinstance(out, io.BufferedIOBase | io.RawIOBase) else data.decode())
            out.flush()
        except Exception as exc:
            return records, lines, exc
        return records, lines, None

    async def flush(self) -> None:
        """Return once every record queued before the call is written."""
        target = self._queued
        if self._progress is None or self._written >= target:
            return
        if self._gathering is not None:
            _end_wait(self._gathering)
        self._flushing += 1
        try:
            async with self._progress:
                await self._progress.wait_for(lambda: self._written >= target or self._writer is None
                                              or self._writer.done())
        finally:
            self._flushing -= 1

    async def recent(self, uid: str, limit: int) -> list[dict[str, Any]]:
        """The key's history, newest first, including records still queued by this process."""
        await self.flush()
        return await self.history.recent(uid, limit)

    async def aclose(self) -> None:
        """Write what is queued, stop the writer and close the file."""
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        self.close()

    def close(self) -> None:
        """Write what is still queued (synchronously: only at shutdown) and close the file."""
        if self._pending:
            batch, self._pending = self._pending, []
            records, _, failure = self._write_lines(batch)
            if failure is not None:
                log.error("audit: writing %d record(s) failed: %s", len(batch), failure)
            self._add_memory_history(records)
            self._written += len(batch)
        if self.path is not None and self._out is not None:
            self._out.close()
        self._out = None
