"""The batched engine on a tiny model: batching, per-request rules inside one batch, cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from deepseek_server.engine.base import GenerationRequest, TextDelta
from deepseek_server.engine.batched import BatchedEngine
from deepseek_server.engine.loading import load_model
from server_harness import ServerThread


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_model(tiny_models["llama"], "fp32", "cpu")


async def test_one_batch_keeps_each_requests_own_rules(loaded) -> None:  # type: ignore[no-untyped-def]
    batches: list[int] = []
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=8, batch_wait_s=0.02, on_batch=batches.append)
    await engine.start()
    try:
        batches.clear()
        prompt = engine.encode_text("The quick brown fox")
        alone = await engine.submit(GenerationRequest(prompt, 12, temperature=0.0)).collect()
        requests = [
            GenerationRequest(prompt, 12, temperature=0.0),
            GenerationRequest(engine.encode_text("a much longer prompt that needs left padding"), 5,
                              temperature=0.0),
            GenerationRequest(prompt, 12, temperature=0.9, seed=42),
            GenerationRequest(prompt, 12, temperature=0.9, seed=42, top_p=0.5),
            GenerationRequest(prompt, 3, temperature=1.0),
        ]
        batches.clear()
        results = await asyncio.gather(*(engine.submit(r).collect() for r in requests))
        assert batches[0] == 5  # submitted together, decoded together
        assert results[0] == alone  # left padding and batch-mates do not change a greedy answer
        assert results[1][1].completion_tokens == 5 and results[1][1].finish_reason == "length"
        assert results[4][1].completion_tokens == 3
        again = await engine.submit(GenerationRequest(prompt, 12, temperature=0.9, seed=42)).collect()
        assert again == results[2]  # a seed reproduces, whoever shares the batch
    finally:
        await engine.stop()


async def test_a_request_joins_the_running_batch(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=4)
    await engine.start()
    try:
        assert engine.joinable is True
        prompt = engine.encode_text("The quick brown fox")
        alone = await engine.submit(GenerationRequest(prompt, 6, temperature=0.0)).collect()
        long = engine.submit(GenerationRequest(engine.encode_text("a long story"), 300, temperature=1.0))
        events = long.events()
        await anext(events)  # the long request is decoding
        short = await engine.submit(GenerationRequest(prompt, 6, temperature=0.0)).collect()
        assert long.result is None, "the short request waited for the long one instead of joining it"
        assert short == alone  # joining a running batch (other length, other padding) changes nothing
        long.cancel()
        async for _ in events:
            pass
        assert long.result is not None and long.result.finish_reason == "cancelled"
    finally:
        await engine.stop()


async def test_cancel_frees_the_slot_at_the_next_step(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=4)
    await engine.start()
    try:
        stream = engine.submit(GenerationRequest(engine.encode_text("hello"), 400, temperature=1.0))
        seen = 0
        async for event in stream.events():
            if isinstance(event, TextDelta):
                seen += 1
                if seen == 3:
                    stream.cancel()
            else:
                assert event.finish_reason == "cancelled"
                assert event.completion_tokens < 50
                break
        waiting = engine.submit(GenerationRequest(engine.encode_text("hi"), 400))
        waiting.cancel()  # still queued: leaves at once
        text, result = await waiting.collect()
        assert (text, result.finish_reason, result.completion_tokens) == ("", "cancelled", 0)
    finally:
        await engine.stop()


def test_client_disconnect_cancels_generation(llama_server: ServerThread, audit_path: Path,
                                              token_factory: Callable[..., str]) -> None:
    headers = {"authorization": f"Bearer {token_factory(uid='uid-disconnect')}"}
    with httpx.stream("POST", f"{llama_server.url}/v1/completions", headers=headers, timeout=30,
                      json={"model": "deepseek-tiny", "prompt": "go", "max_tokens": 64, "stream": True}) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line:
                break  # leave after the first event
    deadline = time.monotonic() + 10
    record = None
    while time.monotonic() < deadline and record is None:
        for line in (audit_path.read_text().splitlines() if audit_path.exists() else []):
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                record = entry
        time.sleep(0.05)
    assert record is not None, "no audit record for the abandoned stream"
    assert record["completion_tokens"] < 64
