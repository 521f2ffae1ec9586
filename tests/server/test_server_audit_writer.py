"""The audit writer batches: records that arrive while a batch is being written wait for the next batch (writes start
at least `BATCH_GATHER_S` apart), every record is written once and in order, and a reader's flush does not wait for
the gathering time."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from deepseek_server import audit
from deepseek_server.audit import AuditLog, MemoryHistory


class SlowAuditLog(AuditLog):
    """Each write takes `write_s` in the worker thread (a busy machine, a slow disk); the start of every write and its
    size are noted."""

    def __init__(self, path: Path, write_s: float) -> None:
        super().__init__(MemoryHistory(), path)
        self.write_s = write_s
        self.writes: list[tuple[float, int]] = []

    async def _write(self, batch: list[Any]) -> None:
        self.writes.append((time.monotonic(), len(batch)))
        await super()._write(batch)

    def _write_lines(self, batch: list[Any]) -> Any:
        time.sleep(self.write_s)
        return super()._write_lines(batch)


def written_ids(path: Path) -> list[int]:
    return [json.loads(line)["i"] for line in path.read_text().splitlines()]


def test_records_arriving_during_a_write_wait_for_the_next_batch(tmp_path: Path) -> None:
    gather = audit.BATCH_GATHER_S
    log = SlowAuditLog(tmp_path / "audit.jsonl", write_s=gather / 2)

    async def traffic() -> None:
        for i in range(300):  # a record every 2 ms or more: some arrive during every write
            log.record({"key_uid": "uid-a", "i": i})
            await asyncio.sleep(0.002)
        await log.aclose()

    asyncio.run(traffic())
    assert written_ids(tmp_path / "audit.jsonl") == list(range(300))
    assert sum(size for _, size in log.writes) == 300
    starts = [at for at, _ in log.writes]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    # the last write is aclose's flush, which need not wait; every other write waited out the gathering time
    assert all(gap >= gather - 1e-6 for gap in gaps[:-1]), (gaps, [size for _, size in log.writes])


def test_a_flush_ends_the_wait_for_more_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "BATCH_GATHER_S", 60.0)  # a reader must not wait for a gathering this long
    log = SlowAuditLog(tmp_path / "audit.jsonl", write_s=0.0)

    async def readers() -> None:
        log.record({"key_uid": "uid-a", "i": 0})  # after a quiet spell: written at once
        await asyncio.wait_for(log.flush(), 20)
        log.record({"key_uid": "uid-a", "i": 1})  # the writer now gathers for 60 s ...
        await asyncio.sleep(0.05)
        log.record({"key_uid": "uid-a", "i": 2})
        assert [item["i"] for item in await asyncio.wait_for(log.recent("uid-a", 10), 20)] == [2, 1, 0]  # ... unless
        await log.aclose()

    asyncio.run(readers())
    assert written_ids(tmp_path / "audit.jsonl") == [0, 1, 2]
    assert [size for _, size in log.writes] == [1, 2]
