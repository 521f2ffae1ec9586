"""Memory-safe batching on a tiny model: the KV-cache budget, the prefill cap, out-of-memory errors that fail only
the request that caused them, and the process memory outside Python (oneDNN's caches, glibc's free heap)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
import torch
from deepseek_server.app import create_app
from deepseek_server.engine import batched
from deepseek_server.engine.base import EngineBusy, GenerationRequest, GenerationStream, TextDelta
from deepseek_server.engine.batched import BatchedEngine
from deepseek_server.engine.loading import LoadedModel, load_model
from deepseek_server.engine.native_memory import ONEDNN_CACHE_ENTRIES, bound_onednn_caches

from devcluster.testing.model_server import ServerThread, tiny_settings
from devcluster.testing.polling import wait_for

PROMPT = "The quick brown fox"
LONG_PROMPT = "Kubernetes schedules pods onto nodes; an operator reconciles custom resources. " * 3


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(tiny_models["llama"], "fp32", "cpu")


class RunsOutOfMemory:
    """The tiny model behind an allocator that fails: a prefill longer than `prefill_limit` tokens, or a decode
    step with `decode_rows` rows or more, raises torch.OutOfMemoryError as a GPU would."""

    def __init__(self, model: Any, prefill_limit: int = 10**9, decode_rows: int = 10**9) -> None:
        self._model = model
        self.prefill_limit = prefill_limit
        self.decode_rows = decode_rows
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, **kwargs: Any) -> Any:
        rows, columns = kwargs["input_ids"].shape
        if columns > self.prefill_limit or (columns == 1 and rows >= self.decode_rows):
            self.failures += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({rows}x{columns})")
        return self._model(**kwargs)


class SlowSteps:
    """The tiny model, `seconds` slower per forward pass: a long request then holds its memory for a known time
    however fast the machine is."""

    def __init__(self, model: Any, seconds: float) -> None:
        self._model, self.seconds = model, seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        return self._model(**kwargs)


def engine_over(loaded: LoadedModel, model: Any = None, **options: Any) -> BatchedEngine:
    wrapped = dataclasses.replace(loaded, model=model) if model is not None else loaded
    return BatchedEngine(wrapped, model_name="m", max_batch_size=8, **options)


async def until_decoding(stream: GenerationStream) -> Any:
    """The stream's event iterator, once its first token has come (so it is in the running batch)."""
    events = stream.events()
    first = await anext(events)
    assert isinstance(first, TextDelta)
    return events


async def test_prefill_out_of_memory_fails_only_the_request_that_needed_it(loaded: LoadedModel) -> None:
    model = RunsOutOfMemory(loaded.model)
    engine = engine_over(loaded, model)
    await engine.start()
    try:
        short, long = engine.encode_text(PROMPT), engine.encode_text(LONG_PROMPT)
        assert len(long) > len(short) + 10
        alone = await engine.submit(GenerationRequest(short, 6, temperature=0.0)).collect()
        model.prefill_limit = len(long) - 1  # only the long prompt's prefill runs out of memory
        running = engine.submit(GenerationRequest(short, 60, temperature=0.0))
        events = await until_decoding(running)
        too_big = engine.submit(GenerationRequest(long, 6, temperature=0.0))
        joining = engine.submit(GenerationRequest(short, 6, temperature=0.0))  # shares the failing prefill
        with pytest.raises(EngineBusy):
            await too_big.wait_admitted()
        assert await asyncio.wait_for(joining.collect(), 60) == alone
        async for _ in events:
            pass
        assert running.result is not None and running.result.finish_reason == "length"
        assert running.result.completion_tokens == 60
        assert model.failures >= 2  # the joint prefill, then the long prompt alone
    finally:
        await engine.stop()


async def test_decode_out_of_memory_drops_the_newest_row(loaded: LoadedModel) -> None:
    model = RunsOutOfMemory(loaded.model)
    engine = engine_over(loaded, model)
    await engine.start()
    try:
        prompt = engine.encode_text(PROMPT)
        alone = await engine.submit(GenerationRequest(prompt, 40, temperature=0.0)).collect()
        model.decode_rows = 3  # a third row does not fit
        first = engine.submit(GenerationRequest(prompt, 40, temperature=0.0))
        second = engine.submit(GenerationRequest(prompt, 40, temperature=0.0))
        events = await until_decoding(second)
        third = engine.submit(GenerationRequest(engine.encode_text("hello"), 40, temperature=0.0))
        with pytest.raises(EngineBusy):
            await asyncio.wait_for(third.collect(), 60)
        assert await asyncio.wait_for(first.collect(), 60) == alone  # the rows that were running are intact
        async for _ in events:
            pass
        assert second.result is not None and second.result.completion_tokens == 40
    finally:
        await engine.stop()


async def test_kv_budget_makes_a_request_wait_for_room(loaded: LoadedModel) -> None:
    batches: list[int] = []
    engine = engine_over(loaded, kv_cache_tokens=300, on_batch=batches.append)
    await engine.start()
    try:
        prompt = engine.encode_text(PROMPT)
        assert engine.max_model_len == 300  # one request must fit the budget alone
        batches.clear()
        big = engine.submit(GenerationRequest(prompt, 200, temperature=0.0))
        await until_decoding(big)
        waiting = engine.submit(GenerationRequest(prompt, 100, temperature=0.0))  # 2 x (prompt + 200) > 300
        _, result = await asyncio.wait_for(waiting.collect(), 120)
        assert big.result is not None, "the second request ran before the first left room for it"
        assert result.completion_tokens == 100
        assert max(batches) == 1
        small = [engine.submit(GenerationRequest(prompt, 40, temperature=0.0)) for _ in range(3)]
        await asyncio.gather(*(s.collect() for s in small))  # 3 x (prompt + 40) fits: they run together
        assert max(batches) == 3
    finally:
        await engine.stop()


async def test_a_request_that_waits_too_long_for_room_is_refused(loaded: LoadedModel) -> None:
    # 280 steps of at least 10 ms: the first request holds the memory for 2.8 s or more, well past the 0.3 s wait
    engine = engine_over(loaded, SlowSteps(loaded.model, 0.01), kv_cache_tokens=300, admission_wait_s=0.3)
    await engine.start()
    try:
        prompt = engine.encode_text(PROMPT)
        big = engine.submit(GenerationRequest(prompt, 280, temperature=0.0))
        events = await until_decoding(big)
        refused = engine.submit(GenerationRequest(prompt, 100, temperature=0.0))
        with pytest.raises(EngineBusy) as excinfo:
            await asyncio.wait_for(refused.wait_admitted(), 60)
        assert excinfo.value.retry_after_s >= 1
        assert big.result is None, "the refusal should come while the first request still holds the memory"
        async for _ in events:
            pass
        assert engine.queue_depth == 0
    finally:
        await engine.stop()


async def test_prefill_cap_chunks_long_prompts_and_spreads_joins(loaded: LoadedModel) -> None:
    plain = engine_over(loaded)
    await plain.start()
    long = plain.encode_text(LONG_PROMPT)
    try:
        expected = await plain.submit(GenerationRequest(long, 12, temperature=0.0)).collect()
    finally:
        await plain.stop()
    batches: list[int] = []
    capped = engine_over(loaded, max_prefill_tokens=16, batch_wait_s=0.05, on_batch=batches.append)
    await capped.start()
    try:
        assert len(long) > 16
        assert await capped.submit(GenerationRequest(long, 12, temperature=0.0)).collect() == expected
        batches.clear()
        twelve = capped.encode_text("The quick brown fox jumps over the lazy dog.")[:12]
        pair = [capped.submit(GenerationRequest(twelve, 8, temperature=0.0)) for _ in range(2)]
        await asyncio.gather(*(s.collect() for s in pair))
        assert batches[0] == 1 and max(batches) == 2  # 2 x 12 prompt tokens > 16: the second joins a step later
    finally:
        await capped.stop()


async def test_finished_rows_get_their_events_when_a_later_row_fails_in_the_same_step(loaded: LoadedModel
                                                                                        ) -> None:
    class FailsOnLogprobs(BatchedEngine):
        def _logprob(self, logits: torch.Tensor, token: int, alternatives: int) -> Any:
            raise RuntimeError("broken log-probabilities")

    engine = FailsOnLogprobs(loaded, model_name="m", max_batch_size=8, batch_wait_s=0.05)
    await engine.start()
    try:
        prompt = engine.encode_text(PROMPT)
        done = engine.submit(GenerationRequest(prompt, 1, temperature=0.0))  # finishes in the first step
        failing = engine.submit(GenerationRequest(prompt, 5, temperature=0.0, logprobs=1))
        _, result = await asyncio.wait_for(done.collect(), 30)
        assert result.finish_reason == "length" and result.completion_tokens == 1
        with pytest.raises(RuntimeError, match="broken log-probabilities"):
            await asyncio.wait_for(failing.collect(), 30)
    finally:
        await engine.stop()


def test_loading_a_model_bounds_onednn_caches_the_environment_does_not_size(tiny_models: dict[str, Path],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # oneDNN keeps a compiled matmul per input shape; unbounded by us, prompts of 2,000 lengths held ~450 MB there
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")  # the operator of the server sized this one
    load_model(tiny_models["llama"], "fp32", "cpu")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_ENTRIES)
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"


async def test_an_idle_engine_gives_the_free_heap_back_once_per_idle_spell(loaded: LoadedModel,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[str] = []  # the thread each trim ran in
    monkeypatch.setattr(batched, "release_free_heap", lambda: trims.append(threading.current_thread().name))

    async def trimmed(count: int) -> None:
        for _ in range(200):
            if len(trims) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"waited 10 s for trim {count}; {len(trims)} so far")

    engine = engine_over(loaded, heap_trim_idle_s=0.5)
    await engine.start()
    try:
        await trimmed(1)  # the warm-up's memory
        await asyncio.sleep(1.5)
        assert len(trims) == 1, "an engine idle since its last trim trims again"
        prompt = engine.encode_text(PROMPT)
        for _ in range(2):  # back to back: no idle spell between them
            await engine.submit(GenerationRequest(prompt, 40, temperature=0.0)).collect()
        assert len(trims) == 1, "trimmed while requests were running"
        await trimmed(2)
        assert all(name.startswith("deepseek-engine") for name in trims), trims  # the worker: never beside a step
    finally:
        await engine.stop()


def test_streams_compare_by_identity() -> None:
    request = GenerationRequest(list(range(100_000)), 4)
    first = GenerationStream(request, lambda s: None)
    twin = copy.copy(first)
    assert first != twin and first == first
    assert len({first, twin}) == 2  # usable in sets and as dict keys


def test_server_answers_503_with_retry_after_when_memory_is_full(tiny_models: dict[str, Path], auth_dir: Path,
                                                                  token_factory: Callable[..., str]) -> None:
    # A refused request waits 50 ms for room: far less than the 180 tokens a holder generates (0.35 s loaded), so
    # the holder is still decoding when the wait ends.
    settings = tiny_settings(tiny_models["llama"], auth_dir=auth_dir, kv_cache_tokens=200, admission_wait_s=0.05,
                             max_new_tokens=180, no_cache=True)
    server = ServerThread(create_app(settings)).start()
    try:
        headers = {"authorization": f"Bearer {token_factory()}"}
        url = f"{server.url}/v1/completions"
        with httpx.stream("POST", url, headers=headers, timeout=60,
                          json={"model": "deepseek-tiny", "prompt": "hello", "max_tokens": 180, "stream": True,
                                "temperature": 0}) as long:
            lines = long.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # decoding
            refused = httpx.post(url, headers=headers, timeout=60,
                                 json={"model": "deepseek-tiny", "prompt": "hello", "max_tokens": 100})
            for _ in lines:
                pass
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "engine_overloaded"
        assert refused.headers["x-ratelimit-limit-requests"] == "1000"  # admitted: the key's limits, as on a 200
        assert int(refused.headers["x-ratelimit-remaining-requests"]) >= 990
        stream_refused = None
        with httpx.stream("POST", url, headers=headers, timeout=60,  # greedy: no early end of sequence
                          json={"model": "deepseek-tiny", "prompt": "hello", "max_tokens": 180, "stream": True,
                                "temperature": 0}):
            stream_refused = httpx.post(url, headers=headers, timeout=60,
                                        json={"model": "deepseek-tiny", "prompt": "hello", "max_tokens": 100,
                                              "stream": True})
        assert stream_refused.status_code == 503  # a stream is refused before its 200, not inside it
        assert stream_refused.headers["x-ratelimit-limit-requests"] == "1000"
        after = httpx.post(url, headers=headers, timeout=60,
                           json={"model": "deepseek-tiny", "prompt": "hello", "max_tokens": 100})
        assert after.status_code == 200  # the memory is free again
    finally:
        server.stop()


def test_a_stream_whose_row_runs_out_of_memory_midway_ends_as_the_503_it_gets_unstreamed(
        loaded: LoadedModel, auth_dir: Path, tmp_path: Path, token_factory: Callable[..., str]) -> None:
    # Two holders decode (10 ms a step, 300 tokens: 3 s or more); a decode step of three rows then runs out of
    # memory, so each request that joins them is failed after its prefill: streamed, after its 200.
    model = RunsOutOfMemory(SlowSteps(loaded.model, 0.01))
    engine = engine_over(loaded, model, max_new_tokens=300)
    audit = tmp_path / "audit.jsonl"
    settings = tiny_settings(Path("unused"), model_name="m", auth_dir=auth_dir, max_model_len=512,
                             max_new_tokens=300, no_cache=True, audit_log=audit)
    server = ServerThread(create_app(settings, engine=engine)).start()
    try:
        headers = {"authorization": f"Bearer {token_factory()}"}
        url = f"{server.url}/v1/completions"
        eos = loaded.tokenizer.eos_token_id
        holder = {"model": "m", "prompt": "hello", "max_tokens": 300, "stream": True, "temperature": 0,
                  "logit_bias": {str(eos): -100}}
        joining = {"model": "m", "prompt": "hello there", "max_tokens": 50, "temperature": 0}
        with httpx.stream("POST", url, headers=headers, timeout=60, json=holder) as first, \
                httpx.stream("POST", url, headers=headers, timeout=60, json=holder) as second:
            readers = [held.iter_lines() for held in (first, second)]  # kept: a reader dropped closes its stream
            for reader in readers:
                assert next(line for line in reader if line.startswith("data:"))  # decoding
            model.decode_rows = 3
            streamed = httpx.post(url, headers=headers, timeout=60, json={**joining, "stream": True})
            unstreamed = httpx.post(url, headers=headers, timeout=60, json=joining)
            assert not first.is_closed and not second.is_closed  # the holders were still decoding
        assert model.failures >= 2
        assert unstreamed.status_code == 503, unstreamed.text
        assert unstreamed.json()["error"]["code"] == "engine_overloaded"
        assert streamed.status_code == 200
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"] == {**unstreamed.json()["error"], "message": ANY}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'deepseek_api_requests_total{route="/v1/completions",status="503"} 2.0' in metrics
        assert 'deepseek_api_requests_total{route="/v1/completions",status="500"}' not in metrics
        request_id = streamed.headers["x-request-id"]
        record = wait_for("the stream's audit record", lambda: next(
            (r for r in map(json.loads, audit.read_text().splitlines()) if r["request_id"] == request_id), None)
            if audit.exists() else None)
        assert (record["status"], record["error_code"], record["stream"]) == (200, "engine_overloaded", True)
    finally:
        server.stop()


def test_a_client_that_leaves_while_waiting_for_memory_gives_up_its_place(auth_dir: Path, tmp_path: Path,
                                                                          token_factory: Callable[..., str]) -> None:
    # Two holders of 2000 tokens fill the KV budget for seconds; a third request waits for room. Its client gives up
    # after 0.3 s: the request leaves the queue then (recorded 499), not once the holders are done, when it would be
    # admitted and prefilled only to be cancelled (and recorded as a 200 nobody received).
    from deepseek_server.tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    model = make_tiny_model("llama", tmp_path / "model", max_len=4096)
    eos = AutoTokenizer.from_pretrained(model).eos_token_id
    audit = tmp_path / "audit.jsonl"
    settings = tiny_settings(model, auth_dir=auth_dir, kv_cache_tokens=4100, admission_wait_s=60,
                             max_model_len=4096, max_new_tokens=2000, no_cache=True, audit_log=audit)
    server = ServerThread(create_app(settings)).start()
    try:
        headers = {"authorization": f"Bearer {token_factory()}"}
        url = f"{server.url}/v1/completions"
        holder = {"model": "deepseek-tiny", "prompt": "hello", "max_tokens": 2000, "stream": True,
                  "logit_bias": {str(eos): -100}}
        with httpx.stream("POST", url, headers=headers, timeout=60, json=holder) as first, \
                httpx.stream("POST", url, headers=headers, timeout=60, json=holder) as second:
            readers = [held.iter_lines() for held in (first, second)]  # kept: a reader dropped closes its stream
            for reader in readers:
                assert next(line for line in reader if line.startswith("data:"))  # decoding
            for stream in (False, True):
                with pytest.raises(httpx.ReadTimeout):  # no room: it waits, and its client leaves
                    httpx.post(url, headers=headers, timeout=httpx.Timeout(60, read=0.3),
                               json={"model": "deepseek-tiny", "prompt": "gone", "max_tokens": 100,
                                     "stream": stream})

            def gone() -> list[dict[str, Any]]:
                records = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
                return [r for r in records if r["status"] != 200]

            left = wait_for("the records of the requests whose clients left", lambda: len(gone()) == 2 and gone())
            metrics = httpx.get(f"{server.url}/metrics").text
            assert "deepseek_requests_in_flight 2.0" in metrics  # the two holders only
            assert not first.is_closed and not second.is_closed  # the holders were still running meanwhile
        assert [(r["status"], r["error_code"], r["stream"]) for r in left] == [
            (499, "client_disconnected", False), (499, "client_disconnected", True)]
        assert all(r["completion_tokens"] is None for r in left)
    finally:
        server.stop()


@pytest.mark.parametrize("value", ["0", "abc", "-1", "", " "])
def test_an_ideep_cache_size_that_is_not_a_positive_number_is_refused_before_any_matmul(value: str) -> None:
    environ = {"LRU_CACHE_CAPACITY": value}
    with pytest.raises(ValueError, match=f"must be a positive whole number, not {value!r}"):
        bound_onednn_caches(environ)
    bound_onednn_caches(good := {"LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"})
    assert good == {"LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
