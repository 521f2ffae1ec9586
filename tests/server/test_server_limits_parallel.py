"""Limits that hold under long and parallel requests, on a real Redis: tokens per minute are reserved at admission
(prompt + max_tokens) and the unused part refunded at the end; `parallel` slots are short leases renewed while the
request runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from deepseek_server.app import create_app
from deepseek_server.engine.base import EngineBusy, GenerationRequest, GenerationStream, TextDelta
from deepseek_server.engine.noop import NoopEngine
from deepseek_server.limits.limiter import RateLimiter
from deepseek_server.limits.policy import KeyLimits
from deepseek_server.limits.redis_store import RedisLimitStore
from deepseek_server.settings import ServerSettings

from devcluster.testing.model_server import ServerThread, SigningKey, mint, write_auth_dir

MODEL = "deepseek-tiny"
TPM = 100
PROMPT = "three word prompt"  # the no-op engine counts words: 3 prompt tokens
MAX_TOKENS = 5  # the no-op engine answers 5 words at most: each request uses 3 + 5 = 8 tokens
RESERVATION = 3 + MAX_TOKENS


class HeldEngine(NoopEngine):
    """The no-op engine, answering each request only after `hold_s`, so that requests overlap."""

    def __init__(self, hold_s: float) -> None:
        super().__init__(model_name=MODEL)
        self.hold_s = hold_s

    def submit(self, request: GenerationRequest) -> GenerationStream:
        answered = super().submit(request)
        held = GenerationStream(request, lambda s: None)
        events = []
        while not answered.queue.empty():
            events.append(answered.queue.get_nowait())

        def release() -> None:
            for event in events:
                held.queue.put_nowait(event)

        asyncio.get_running_loop().call_later(self.hold_s, release)
        return held


class FailingEngine(NoopEngine):
    """The no-op engine failing as the builtin engine can, by prompt: `busy` waits for KV-cache room in vain (503
    before a token), `dropped` runs out of memory after a token (503 while generating), `broken` fails (500)."""

    def submit(self, request: GenerationRequest) -> GenerationStream:
        how = {4: "busy", 7: "dropped", 6: "broken"}.get(request.prompt_ids[0]) if request.prompt_ids else None
        if how is None:
            return super().submit(request)
        stream = GenerationStream(request, lambda s: None)
        stream.admission = asyncio.get_running_loop().create_future()
        if how == "busy":
            stream.admission.set_result(EngineBusy("no KV-cache room for the request", retry_after_s=2))
            return stream
        stream.admission.set_result(None)
        stream.queue.put_nowait(TextDelta("ok ", 1))
        stream.queue.put_nowait(EngineBusy("out of memory", retry_after_s=2) if how == "dropped"
                                else RuntimeError("the model broke"))
        return stream


def server_with(tmp_path: Path, redis_url: str | None, limits: dict[str, Any], hold_s: float = 0.0,
                engine: NoopEngine | None = None) -> tuple[ServerThread, str]:
    key = SigningKey(kid="parallel")
    uid = f"uid-parallel-{time.monotonic_ns()}"
    auth = write_auth_dir(tmp_path / "auth", [key], limits={uid: limits})
    # a generous Redis timeout: 30 connections opened at once on a loaded machine must not fall back to
    # per-replica limits in memory, which would count part of the burst apart from the rest
    settings = ServerSettings(model_name=MODEL, auth_dir=str(auth), redis_url=redis_url, no_cache=True,
                              audit_log=str(tmp_path / "audit.jsonl"), redis_timeout_s=10)
    return (ServerThread(create_app(settings, engine=engine or HeldEngine(hold_s))).start(), mint(key, uid=uid))


async def fire(url: str, token: str, count: int, max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"authorization": f"Bearer {token}"},
                                 limits=httpx.Limits(max_connections=count + 5)) as client:
        return list(await asyncio.gather(*(
            client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens})
            for _ in range(count))))


def test_parallel_requests_overshoot_tokens_per_minute_by_one_reservation_at_most(tmp_path: Path,
                                                                                   redis_url: str) -> None:
    server, token = server_with(tmp_path, redis_url, {"rps": 1000, "burst": 1000, "tpm": TPM, "parallel": None},
                                hold_s=1.5)
    try:
        responses = asyncio.run(fire(server.url, token, 30, MAX_TOKENS))
    finally:
        server.stop()
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(refused) == 30, {r.status_code for r in responses}
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    # Charged only at the end, all 30 (240 tokens) would be admitted while the first ones still run.
    assert used <= TPM + RESERVATION, (used, len(admitted))
    assert used >= TPM - RESERVATION  # and the budget is used, not refused early
    assert {r.json()["error"]["type"] for r in refused} == {"tokens"}


def test_the_unused_part_of_a_reservation_is_refunded(tmp_path: Path, redis_url: str) -> None:
    # Each request reserves 3 + 40 = 43 tokens but uses 8: without refunds the third would be refused.
    server, token = server_with(tmp_path, redis_url, {"rps": 1000, "burst": 1000, "tpm": TPM, "parallel": None},
                                hold_s=0.0)
    try:
        statuses = [asyncio.run(fire(server.url, token, 1, 40))[0].status_code for _ in range(10)]
    finally:
        server.stop()
    assert statuses == [200] * 10  # 80 tokens used of 100


RATE_LIMIT_HEADERS = {f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset")
                      for kind in ("requests", "tokens")}


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_an_admitted_request_the_engine_fails_has_its_rate_limit_headers_and_gives_back_its_reservation(
        tmp_path: Path, redis_url: str, backend: str) -> None:
    """As OpenAI, every answer to an admitted request says where the key stands: a 503 (no KV-cache room, or out of
    memory while generating) or a 500 too, not only a 200 or a 429. And the failed request frees its parallel slot
    and gets back the unused part of its reservation (each reserves 200 + its prompt of 1000 tokens per minute)."""
    server, token = server_with(tmp_path, redis_url if backend == "redis" else None,
                                {"rps": 1000, "burst": 1000, "tpm": 1000, "parallel": 1}, engine=FailingEngine(MODEL))
    failures: list[httpx.Response] = []
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {token}"}) as client:
            for prompt in ("busy", "dropped", "broken") * 2:  # a slot or reservation kept would refuse the next ones
                failures.append(client.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                                     "max_tokens": 200}))
            after = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5})
    finally:
        server.stop()
    assert [(r.status_code, r.json()["error"]["code"]) for r in failures] == [
        (503, "engine_overloaded"), (503, "engine_overloaded"), (500, None)] * 2
    for response in failures:
        assert set(response.headers) >= RATE_LIMIT_HEADERS, (response.status_code, response.headers)
        assert response.headers["x-ratelimit-limit-requests"] == "1000"
        assert response.headers["x-ratelimit-limit-tokens"] == "1000"
        assert len(response.headers.get_list("x-ratelimit-remaining-requests")) == 1
        assert "x-ratelimit-backend" not in response.headers  # Redis answered
        if response.status_code == 503:
            assert response.headers.get_list("retry-after") == ["2"]  # the engine's hint, once
    assert after.status_code == 200, after.text
    # the failures charged only what they used (at most 2 tokens each): without refunds 6 x 201 would be outstanding
    assert int(after.headers["x-ratelimit-remaining-tokens"]) >= 1000 - RESERVATION - 6 * 2 - 1


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[tuple[RateLimiter, RedisLimitStore]]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    store = RedisLimitStore(client, prefix=f"test-lease:{time.monotonic_ns()}", lease_s=0.6)
    yield RateLimiter(store), store
    await client.aclose()


async def test_a_running_requests_parallel_slot_is_renewed_past_its_lease(
        limiter: tuple[RateLimiter, RedisLimitStore]) -> None:
    rate_limiter, _store = limiter
    limits = KeyLimits(rps=1000, burst=1000, parallel=1)
    running = await rate_limiter.acquire("u", limits)
    assert running.decision.allowed
    await asyncio.sleep(2.0)  # more than three leases: only renewals keep the slot
    second = await rate_limiter.acquire("u", limits)
    assert not second.decision.allowed and second.decision.kind == "parallel"
    await rate_limiter.release(running, 0)
    assert running.renewal is None
    after = await rate_limiter.acquire("u", limits)
    assert after.decision.allowed
    await rate_limiter.release(after, 0)


async def test_a_lost_release_frees_the_slot_after_one_short_lease(
        limiter: tuple[RateLimiter, RedisLimitStore]) -> None:
    rate_limiter, store = limiter
    limits = KeyLimits(rps=1000, burst=1000, parallel=1)
    orphan = await rate_limiter.acquire("v", limits)
    assert orphan.decision.allowed and orphan.renewal is not None
    orphan.renewal.cancel()  # its replica died, or its release was lost in a Redis blip
    assert not (await rate_limiter.acquire("v", limits)).decision.allowed
    deadline = time.monotonic() + 10 * store.lease_s
    while not (lease := await rate_limiter.acquire("v", limits)).decision.allowed:
        assert time.monotonic() < deadline, "the lost slot was never freed"
        await asyncio.sleep(0.1)
    await rate_limiter.release(lease, 0)
    assert RedisLimitStore(store.client).lease_s <= 60  # the production default is short too


async def test_a_cache_hit_admission_holds_no_parallel_slot(limiter: tuple[RateLimiter, RedisLimitStore]) -> None:
    rate_limiter, _store = limiter
    limits = KeyLimits(rps=1000, burst=1000, parallel=1)
    hit = await rate_limiter.acquire("w", limits, hold=False)
    assert hit.decision.allowed and hit.renewal is None
    running = await rate_limiter.acquire("w", limits)
    assert running.decision.allowed  # the hit took no slot
    refused = await rate_limiter.acquire("w", limits, hold=False)
    assert not refused.decision.allowed and refused.decision.kind == "parallel"
    await rate_limiter.release(running, 0)


class SlowRepliesProxy:
    """A TCP relay to Redis that holds Redis's replies for `delay_s` while it is set: a Redis that runs a command but
    answers after the client's timeout."""

    def __init__(self, redis_url: str) -> None:
        address = urlsplit(redis_url)
        self.target = (address.hostname or "127.0.0.1", address.port or 6379)
        self.delay_s = 0.0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        reader, writer = await asyncio.open_connection(*self.target)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await source.read(65536):
                    if slow and self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(client_reader, writer, False), pipe(reader, client_writer, True))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.parametrize("lost", ["answer too late", "request cancelled"])
async def test_a_slot_whose_admission_lost_its_answer_is_freed_once_redis_answers(redis_url: str, lost: str) -> None:
    """The admission ran in Redis (slot taken, tokens reserved) but its answer came after the client's timeout, or the
    request was cancelled while it waited: the slot was held, with its reservation, until its 30 s lease ran out (a
    key with `parallel: 1` was refused meanwhile). It is now freed, and the reservation refunded, once Redis answers
    again."""
    import redis.asyncio as aioredis

    proxy = SlowRepliesProxy(redis_url)
    slow_client = aioredis.from_url(await proxy.start(), socket_timeout=0.3)
    direct = aioredis.from_url(redis_url)
    prefix = f"test-lost-answer:{time.monotonic_ns()}"
    store = RedisLimitStore(slow_client, prefix=prefix, lease_s=30.0)  # as in production: a lost slot waits 30 s
    limiter = RateLimiter(store, retry_redis_after_s=0.5)
    limits = KeyLimits(rps=1000, burst=1000, tpm=600, parallel=1)
    slots, tokens = f"{prefix}:{{w}}:par", f"{prefix}:{{w}}:tokens"
    try:
        await slow_client.ping()  # connected (its handshake answered) before the answers slow down
        proxy.delay_s = 1.0
        if lost == "answer too late":
            lease = await limiter.acquire("w", limits, reserve_tokens=300)
            assert lease.decision.backend == "memory"  # served on per-replica limits meanwhile
            limiter.release_now(lease, 10)
        else:
            admission = asyncio.ensure_future(limiter.acquire("w", limits, reserve_tokens=300))
            await asyncio.sleep(0.1)
            admission.cancel()
            with pytest.raises(asyncio.CancelledError):
                await admission
        proxy.delay_s = 0.0
        await asyncio.sleep(0.2)
        assert await direct.zcard(slots) == 1 and await direct.exists(tokens)  # it ran in Redis
        deadline = time.monotonic() + 10
        while await direct.zcard(slots):
            assert time.monotonic() < deadline, "the slot is still taken"
            await asyncio.sleep(0.1)
        assert not await direct.exists(tokens)  # the 300 reserved tokens refunded (nothing was used in Redis)
        await asyncio.sleep(0.6)  # Redis is tried again after retry_redis_after_s
        again = await limiter.acquire("w", limits, reserve_tokens=10)
        assert again.decision.allowed and again.decision.backend == "redis"
        await limiter.release(again, 10)
    finally:
        await slow_client.aclose()
        await direct.aclose()
        await proxy.stop()


async def test_a_release_whose_answer_was_lost_is_settled_once_and_only_if_it_did_not_run(redis_url: str) -> None:
    import redis.asyncio as aioredis

    proxy = SlowRepliesProxy(redis_url)
    slow_client = aioredis.from_url(await proxy.start(), socket_timeout=0.3)
    direct = aioredis.from_url(redis_url)
    prefix = f"test-lost-release:{time.monotonic_ns()}"
    store = RedisLimitStore(slow_client, prefix=prefix, lease_s=30.0)
    limiter = RateLimiter(store, retry_redis_after_s=0.5)
    limits = KeyLimits(rps=1000, burst=1000, tpm=600, parallel=1)
    try:
        lease = await limiter.acquire("x", limits, reserve_tokens=300)
        assert lease.decision.backend == "redis"
        proxy.delay_s = 1.0
        await limiter.release(lease, 200)  # ran in Redis, answer lost: settling again must not refund twice
        proxy.delay_s = 0.0
        await asyncio.sleep(1.5)  # the background settlement has run
        token_state = await direct.get(f"{prefix}:{{x}}:tokens")
        assert token_state is not None, "the unused 100 tokens were refunded twice"
        seconds, micros = await direct.time()
        outstanding = float(token_state.decode().split(":")[0]) - (seconds + micros / 1e6)
        assert 15 <= outstanding <= 20.1, outstanding  # 200 tokens used: 20 s of a 600-per-minute budget
        assert await direct.zcard(f"{prefix}:{{x}}:par") == 0
    finally:
        await slow_client.aclose()
        await direct.aclose()
        await proxy.stop()
