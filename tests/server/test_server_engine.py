"""The batched engine on a tiny model: batching, per-request rules inside one batch, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from deepseek_server.app import create_app
from deepseek_server.engine.base import GenerationRequest, TextDelta
from deepseek_server.engine.batched import BatchedEngine
from deepseek_server.engine.json_constraint import JsonMatcher
from deepseek_server.engine.loading import load_model

from devcluster.testing.model_server import ServerThread, tiny_settings
from devcluster.testing.polling import wait_for

ARCHITECTURES = ["llama", "qwen2", "deepseek_v3"]
# distinct prompts of different lengths: each row of a batch has its own text and its own padding
PROMPTS = ["The quick brown fox", "a much longer prompt that needs left padding", "1 2 3", "Dear friend,",
           "Once upon a time, in a land far away, there lived"]
LONG_PROMPT = ("A prompt that is longer than everything the running batch holds so far: it has many more tokens "
               "than the short running request and its first few generated tokens together.")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def loaded(request: pytest.FixtureRequest, tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_model(tiny_models[request.param], "fp32", "cpu")


def without_eos(loaded) -> tuple[tuple[int, float], ...]:  # type: ignore[no-untyped-def]
    """A logit bias that keeps a sampled request from ending before its max_new_tokens."""
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return tuple((int(i), -100.0) for i in ids if i is not None)


async def solo(engine: BatchedEngine, request: GenerationRequest):  # type: ignore[no-untyped-def]
    """The request's answer when it has the engine to itself."""
    return await engine.submit(request).collect()


async def test_one_batch_keeps_each_requests_own_rules(loaded) -> None:  # type: ignore[no-untyped-def]
    batches: list[int] = []
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=8, batch_wait_s=0.05, on_batch=batches.append)
    await engine.start()
    try:
        no_eos = without_eos(loaded)
        requests = [GenerationRequest(engine.encode_text(text), 12, temperature=0.0) for text in PROMPTS]
        requests += [
            GenerationRequest(engine.encode_text(PROMPTS[0]), 12, temperature=0.9, seed=42),
            GenerationRequest(engine.encode_text(PROMPTS[1]), 12, temperature=0.9, seed=42, top_p=0.5),
            GenerationRequest(engine.encode_text(PROMPTS[2]), 3, temperature=1.0, seed=7, logit_bias=no_eos),
        ]
        alone = [await solo(engine, r) for r in requests]
        batches.clear()
        results = await asyncio.gather(*(engine.submit(r).collect() for r in requests))
        assert batches[0] == len(requests)  # submitted together, decoded together
        for index, (together, by_itself) in enumerate(zip(results, alone, strict=True)):
            # left padding and batch-mates change neither a greedy answer nor a seeded sample
            assert together == by_itself, f"row {index} ({requests[index]}) changed in the batch"
        assert len({text for text, _ in results[:len(PROMPTS)]}) > 1, "distinct prompts, yet one answer for all"
        assert results[-1][1].completion_tokens == 3 and results[-1][1].finish_reason == "length"
    finally:
        await engine.stop()


@pytest.mark.parametrize("failing", ["mask", "accept"])
async def test_a_failure_in_one_rows_json_constraint_fails_that_row_alone(
        loaded, failing: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A row's own token shaping (its grammar's mask, or its grammar taking the sampled token) failing mid-batch ends
    that request with the error; its batch-mates get the answers they get alone."""
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=8, batch_wait_s=0.05)
    await engine.start()
    try:
        no_eos = without_eos(loaded)
        plain = [GenerationRequest(engine.encode_text(text), 8, temperature=0.0, logit_bias=no_eos)
                 for text in PROMPTS[:3]]
        alone = [await solo(engine, r) for r in plain]
        real = getattr(JsonMatcher, failing)
        calls = 0

        def fail_at_the_third_step(self, *args):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("the grammar lost its place")
            return real(self, *args)

        monkeypatch.setattr(JsonMatcher, failing, fail_at_the_third_step)
        constrained = GenerationRequest(engine.encode_text(PROMPTS[3]), 8, temperature=0.0, logit_bias=no_eos,
                                        json_schema=json.dumps({"type": "object", "required": ["answer"],
                                                                "properties": {"answer": {"type": "string"}}}))
        results = await asyncio.gather(*(engine.submit(r).collect() for r in [*plain, constrained]),
                                       return_exceptions=True)
        assert isinstance(results[-1], RuntimeError) and "the grammar lost its place" in str(results[-1])
        assert results[:-1] == alone
        assert calls >= 3
        # the engine goes on serving
        assert await solo(engine, plain[0]) == alone[0]
    finally:
        await engine.stop()


async def test_requests_join_the_running_batch(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=4, max_new_tokens=400)
    await engine.start()
    try:
        assert engine.joinable is True
        running_request = GenerationRequest(engine.encode_text("a story"), 200, temperature=1.0, seed=3,
                                            logit_bias=without_eos(loaded))
        joiners = [GenerationRequest(engine.encode_text(text), 8, temperature=0.0)
                   for text in (PROMPTS[0], LONG_PROMPT, PROMPTS[3])]
        assert len(joiners[1].prompt_ids) > len(running_request.prompt_ids) + 20
        running_alone = await solo(engine, running_request)
        joiners_alone = [await solo(engine, r) for r in joiners]

        running = engine.submit(running_request)
        events = running.events()
        first = await anext(events)  # the running request is decoding
        joined = await asyncio.gather(*(engine.submit(r).collect() for r in joiners))
        assert running.result is None, "the joiners waited for the running request instead of joining it"
        # joining a running batch (other lengths, a prompt longer than the batch so far) changes no one's answer
        assert joined == joiners_alone
        rest = [event async for event in events]
        text = "".join(e.text for e in [first, *rest] if isinstance(e, TextDelta))
        assert (text, running.result) == running_alone
        assert running.result.completion_tokens == 200
    finally:
        await engine.stop()


async def test_cancel_frees_the_slot_at_the_next_step(loaded) -> None:  # type: ignore[no-untyped-def]
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=4)
    await engine.start()
    try:
        stream = engine.submit(GenerationRequest(engine.encode_text("hello"), 200, temperature=1.0, seed=11,
                                                 logit_bias=without_eos(loaded)))
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
        waiting = engine.submit(GenerationRequest(engine.encode_text("hi"), 200))
        waiting.cancel()  # still queued: leaves at once
        text, result = await waiting.collect()
        assert (text, result.finish_reason, result.completion_tokens) == ("", "cancelled", 0)
    finally:
        await engine.stop()


def test_client_disconnect_cancels_generation(llama_server: ServerThread, audit_path: Path,
                                              tiny_models: dict[str, Path], token_factory: Callable[..., str]) -> None:
    """A client that leaves a stream after its first event: the generation stops, and the audit record says the
    answer (a 200 already begun) was not all delivered: `error_code` client_disconnected."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_models["llama"]).eos_token_id
    headers = {"authorization": f"Bearer {token_factory(uid='uid-disconnect')}"}
    with httpx.stream("POST", f"{llama_server.url}/v1/completions", headers=headers, timeout=30,
                      json={"model": "deepseek-tiny", "prompt": "go", "max_tokens": 64, "stream": True,
                            "logit_bias": {str(eos): -100}}) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line:
                break  # leave after the first event
    deadline = time.monotonic() + 60
    record = None
    while time.monotonic() < deadline and record is None:
        for line in (audit_path.read_text().splitlines() if audit_path.exists() else []):
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                record = entry
        time.sleep(0.05)
    assert record is not None, "no audit record for the abandoned stream"
    assert record["completion_tokens"] < 64
    assert (record["status"], record["error_code"], record["stream"]) == (200, "client_disconnected", True)


def test_a_non_streamed_request_whose_client_leaves_while_generating_is_cancelled_and_recorded_499(
        auth_dir: Path, tmp_path: Path, token_factory: Callable[..., str]) -> None:
    """The client leaves while its answer of 4000 tokens is being generated: the generation stops within a quarter
    second, and the audit record and the metrics say 499 client_disconnected, as for a request that left while
    waiting for memory, not 200 (an answer nobody received)."""
    from deepseek_server.tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    model = make_tiny_model("llama", tmp_path / "model", max_len=4096)
    eos = AutoTokenizer.from_pretrained(model).eos_token_id
    audit = tmp_path / "audit.jsonl"
    settings = tiny_settings(model, auth_dir=auth_dir, max_model_len=4096, max_new_tokens=4000, no_cache=True,
                             audit_log=audit)
    server = ServerThread(create_app(settings)).start()
    registry = server.app.state.services.metrics.registry

    def decode_steps() -> float:
        return registry.get_sample_value("deepseek_batch_size_count") or 0.0

    async def leave_while_generating() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            started = decode_steps()
            call = asyncio.create_task(client.post(
                f"{server.url}/v1/completions", headers={"authorization": f"Bearer {token_factory()}"},
                json={"model": "deepseek-tiny", "prompt": "go", "max_tokens": 4000, "logit_bias": {str(eos): -100}}))
            deadline = time.monotonic() + 30
            while decode_steps() < started + 5:  # generating
                assert not call.done(), f"answered before it was generating: {call.result().status_code}"
                assert time.monotonic() < deadline, "the request never reached the engine"
                await asyncio.sleep(0.01)
            call.cancel()  # closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await call

    try:
        asyncio.run(leave_while_generating())
        records = wait_for("the request's audit record", lambda: audit.exists() and audit.read_text().splitlines())
        steps = decode_steps()
        time.sleep(0.5)
        assert decode_steps() == steps, "the engine kept generating for a client that left"
        requests = {sample.labels["status"]: sample.value
                    for sample in registry.collect() for sample in sample.samples
                    if sample.name == "deepseek_api_requests_total" and sample.labels["route"] == "/v1/completions"}
    finally:
        server.stop()
    record = json.loads(records[0])
    assert (record["status"], record["error_code"], record["stream"]) == (499, "client_disconnected", False)
    assert 0 < record["completion_tokens"] < 4000  # what it generated before it was cancelled
    assert requests == {"499": 1.0}


def test_two_concurrent_http_streams_each_get_their_own_answer(llama_server: ServerThread,
                                                               token_factory: Callable[..., str]) -> None:
    prompts = ["Tell me about the sea", "List three prime numbers and then explain why they are prime"]

    def body(prompt: str, stream: bool) -> dict[str, object]:
        return {"model": "deepseek-tiny", "prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": stream}

    # each answer alone, from another key than the streams' (the response cache is per key)
    solo_headers = {"authorization": f"Bearer {token_factory(uid=f'uid-solo-{uuid.uuid4().hex[:8]}')}"}
    alone = [httpx.post(f"{llama_server.url}/v1/completions", json=body(p, False), headers=solo_headers,
                        timeout=60).json()["choices"][0] for p in prompts]

    headers = {"authorization": f"Bearer {token_factory(uid=f'uid-streams-{uuid.uuid4().hex[:8]}')}"}
    start = threading.Barrier(len(prompts))
    streamed: dict[int, tuple[str, str | None, str]] = {}

    def read(index: int) -> None:
        start.wait(30)
        text, finish = "", None
        with httpx.stream("POST", f"{llama_server.url}/v1/completions", json=body(prompts[index], True),
                          headers=headers, timeout=60) as response:
            cache = response.headers.get("x-cache", "")
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        streamed[index] = (text, finish, cache)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(prompts))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(120)
    for index, choice in enumerate(alone):
        text, finish, cache = streamed[index]
        assert cache != "hit"
        assert (text, finish) == (choice["text"], choice["finish_reason"]), f"stream {index} got another answer"
    assert alone[0]["text"] != alone[1]["text"]
