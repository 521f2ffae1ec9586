"""Shared state through a real Redis: limits across two server processes, history across replicas, and the
documented fallback when Redis is unreachable."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from deepseek_server.app import create_app
from deepseek_server.engine.noop import NoopEngine
from deepseek_server.limits.policy import KeyLimits
from deepseek_server.limits.redis_store import RedisLimitStore
from prometheus_client.parser import text_string_to_metric_families

from devcluster.testing.model_server import (
    ServerThread,
    SigningKey,
    mint,
    server_processes,
    tiny_settings,
    write_auth_dir,
)
from devcluster.testing.ports import free_port

MODEL = "deepseek-tiny"
SHARED_UID = "uid-shared"
RPS, BURST = 0.5, 4


def test_two_processes_sharing_redis_admit_no_more_than_the_limit(
    tiny_models: dict[str, Path], tmp_path: Path, redis_url: str
) -> None:
    key = SigningKey(kid="shared-key")
    auth = write_auth_dir(tmp_path / "auth", [key],
                          limits={SHARED_UID: {"rps": RPS, "burst": BURST, "tpm": None, "parallel": None}})
    args = ["--model", str(tiny_models["llama"]), "--model-name", MODEL, "--precision", "fp32", "--device", "cpu",
            "--auth-dir", str(auth), "--redis-url", redis_url, "--max-new-tokens", "8", "--max-model-len", "128",
            "--record-key", "shared-record-key-of-this-deployment"]  # replicas share cache entries through it
    token = mint(key, uid=SHARED_UID)
    with server_processes([args, args], log_dir=tmp_path) as servers:
        statuses: list[int] = []
        lock = threading.Lock()

        def fire(url: str) -> None:
            for _ in range(8):
                response = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {token}"},
                                      json={"model": MODEL, "prompt": "shared", "max_tokens": 1}, timeout=30)
                with lock:
                    statuses.append(response.status_code)

        started = time.monotonic()
        threads = [threading.Thread(target=fire, args=(url,)) for url, _ in servers for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        admitted = statuses.count(200)
        assert set(statuses) <= {200, 429}
        # each process alone would admit BURST; together they must share one budget
        assert BURST <= admitted <= BURST + int(RPS * elapsed) + 1, (admitted, elapsed)
        assert statuses.count(429) == len(statuses) - admitted

        # history written through one replica is read through the other
        a, b = servers[0][0], servers[1][0]
        history_token = mint(key, uid="uid-history-shared")
        done = httpx.post(f"{a}/v1/completions", headers={"authorization": f"Bearer {history_token}"},
                          json={"model": MODEL, "prompt": "where", "max_tokens": 1}, timeout=30)
        assert done.status_code == 200
        # A replica writes its records in batches, so another replica sees a call a moment later, not at once. Each
        # look is an API call of the same key too: b's records of its earlier looks may show up beside it.
        deadline = time.monotonic() + 5
        while True:
            seen = httpx.get(f"{b}/v1/history", headers={"authorization": f"Bearer {history_token}"}).json()["data"]
            if any(r["route"] == "/v1/completions" for r in seen) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [r["request_id"] for r in seen if r["route"] == "/v1/completions"] == [done.headers["x-request-id"]]
        assert {r["route"] for r in seen} <= {"/v1/completions", "/v1/history"}, seen

        # a deterministic answer cached by one replica is a hit on the other
        body = {"model": MODEL, "prompt": "cache me", "max_tokens": 4, "temperature": 0}
        other = mint(key, uid="uid-cache-shared")
        first = httpx.post(f"{a}/v1/completions", headers={"authorization": f"Bearer {other}"}, json=body)
        second = httpx.post(f"{b}/v1/completions", headers={"authorization": f"Bearer {other}"}, json=body)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert first.json()["choices"] == second.json()["choices"]


def test_unreachable_redis_falls_back_to_per_replica_limits(tmp_path: Path) -> None:
    key = SigningKey(kid="fallback-key")
    auth = write_auth_dir(tmp_path / "auth", [key], default_limits={"rps": 0.5, "burst": 2, "tpm": None,
                                                                    "parallel": None})
    settings = tiny_settings(tmp_path / "unused", auth_dir=auth, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                             model_name="noop")
    server = ServerThread(create_app(settings, engine=NoopEngine())).start()
    try:
        headers = {"authorization": f"Bearer {mint(key, uid='uid-fallback')}"}
        errors_before = backend_errors(server)
        started = time.monotonic()
        responses = [httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30,
                                json={"model": "noop", "prompt": "still up", "max_tokens": 2}) for _ in range(3)]
        took = time.monotonic() - started
        statuses = [r.status_code for r in responses]
        # burst 2 at 0.5/s, enforced in memory: a slow machine may refill one more, never the burst plus more
        assert statuses[:2] == [200, 200] and statuses.count(200) <= 2 + int(0.5 * took), (statuses, took)
        assert all(r.headers["x-ratelimit-backend"] == "memory-fallback" for r in responses)
        assert responses[0].json()["choices"][0]["text"] == "ok from "
        # each failed try of Redis counts once; after a failure Redis is left alone for 5 s before the next try
        assert 1 <= backend_errors(server) - errors_before <= 1 + int(took / 5)
        history = httpx.get(f"{server.url}/v1/history", headers=headers)
        assert history.status_code == 503
        assert history.json()["error"]["code"] == "history_unavailable"
        assert history.headers["retry-after"] == "1"  # as every other 503 the server answers
    finally:
        server.stop()


def backend_errors(server: ServerThread) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return next(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == "deepseek_ratelimit_backend_errors_total")


@pytest.fixture
async def redis_store(redis_url: str):  # type: ignore[no-untyped-def]
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    yield RedisLimitStore(client, prefix=f"test:{time.monotonic_ns()}")
    await client.aclose()


async def test_redis_store_parallel_and_tokens(redis_store: RedisLimitStore) -> None:
    limits = KeyLimits(rps=1000, burst=1000, tpm=60, parallel=2)
    first = await redis_store.acquire("u", limits)
    second = await redis_store.acquire("u", limits)
    third = await redis_store.acquire("u", limits)
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert third.kind == "parallel"
    await redis_store.release("u", limits, first.lease_id, tokens_used=59)
    fourth = await redis_store.acquire("u", limits)
    assert fourth.allowed and fourth.remaining_tokens == 1
    await redis_store.release("u", limits, second.lease_id, tokens_used=5)
    await redis_store.release("u", limits, fourth.lease_id, tokens_used=0)
    refused = await redis_store.acquire("u", limits)
    assert not refused.allowed and refused.kind == "tokens" and refused.retry_after_s > 0
    assert json.dumps(refused.headers())  # headers render


async def test_redis_store_a_changed_tokens_per_minute_limit_applies_from_the_next_request(
        redis_store: RedisLimitStore) -> None:
    low, high = KeyLimits(rps=1000, burst=1000, tpm=20), KeyLimits(rps=1000, burst=1000, tpm=10_000)
    assert (await redis_store.acquire("t", low, reserve_tokens=13, hold=False)).allowed
    assert (await redis_store.acquire("t", low, reserve_tokens=13, hold=False)).allowed
    assert not (await redis_store.acquire("t", low, hold=False)).allowed
    raised = await redis_store.acquire("t", high, reserve_tokens=13, hold=False)
    assert raised.allowed and 10_000 - 40 <= raised.remaining_tokens <= 10_000 - 39
    await redis_store.release("t", high, raised.lease_id, tokens_used=3, reserved=13)
    assert 10_000 - 30 <= (await redis_store.acquire("t", high, hold=False)).remaining_tokens <= 10_000 - 29
    assert not (await redis_store.acquire("t", low, hold=False)).allowed


async def test_redis_store_carries_over_the_token_debt_the_version_before_wrote(
        redis_store: RedisLimitStore) -> None:
    """The version before kept a bare TAT under `:tok`; its scripts cannot read the form `:tokens` holds, so it is
    left unchanged for them, and its debt is read once here, then the old key is gone."""
    limits = KeyLimits(rps=1000, burst=1000, tpm=60)  # one token a second
    client, (_, tokens_key, _, legacy_key) = redis_store.client, redis_store._keys("v")
    now = await client.time()
    await client.set(legacy_key, str(now[0] + now[1] / 1e6 + 50), px=60_000)  # 50 tokens outstanding
    first = await redis_store.acquire("v", limits, reserve_tokens=5, hold=False)
    assert first.allowed and first.remaining_tokens in (4, 5)  # 60 - 50 - 5, give or take a second
    assert await client.get(legacy_key) is None and (await client.get(tokens_key)).count(b":") == 1
    await client.set(legacy_key, str(now[0] + now[1] / 1e6 + 500), px=60_000)  # written by an old server meanwhile
    second = await redis_store.acquire("v", limits, hold=False)
    assert second.remaining_tokens in (4, 5)  # `:tokens` exists: the old key is not read again


async def test_a_key_with_burst_one_is_admitted_at_redis_clock_times(redis_store: RedisLimitStore) -> None:
    """Redis's clock is seconds since 1970 (about 1.8e9, where a double's step is 2.4e-7 s): `(now + 1/rps) - now`
    can come out above 1/rps, which a margin of 1e-9 took for a full bucket. A key of `burst: 1` was refused on its
    very first request at most rates (5, 6, 9, 13 requests per second...), and on every one after."""
    for rps in (3, 5, 6, 7, 9, 11, 13, 17, 3000):
        for n in range(4):
            first = await redis_store.acquire(f"b{rps}-{n}", KeyLimits(rps=rps, burst=1), hold=False)
            assert first.allowed, (rps, n, first.kind, first.retry_after_s)
            assert first.remaining_requests == 0


async def test_redis_store_gcra_burst(redis_store: RedisLimitStore) -> None:
    limits = KeyLimits(rps=1, burst=3)
    results = [await redis_store.acquire("g", limits) for _ in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert [r.remaining_requests for r in results[:3]] == [2, 1, 0]
    assert 0 < results[3].retry_after_s <= 1.0




async def test_a_cached_answer_read_from_redis_expires_when_the_shared_entry_does(redis_url: str) -> None:
    """Replica A caches an answer in Redis; replica B reads it halfway through its TTL and keeps a local copy, which
    must expire with the shared entry: with a full TTL of its own, B would serve it up to twice `ttl_s` after it was
    generated."""
    import redis.asyncio as aioredis
    from deepseek_server.auth.tokens import Principal
    from deepseek_server.cache import ResponseCache
    from deepseek_server.request_keys import RequestKeys

    client = aioredis.from_url(redis_url)
    try:
        prefix = f"test-cache:{time.monotonic_ns()}"
        keys = RequestKeys(b"k" * 32)
        caller = Principal(uid="u", subject="s", token_id="t", scopes=frozenset(), env="dev", expires_at=0)
        writer = ResponseCache(ttl_s=2, keys=keys, redis=client, prefix=prefix)
        reader = ResponseCache(ttl_s=2, keys=keys, redis=client, prefix=prefix)
        await writer.put("request", {"answer": 1}, caller)
        time.sleep(1.2)
        assert await reader.get("request", caller) == {"answer": 1}  # from Redis, 0.8 s left there
        time.sleep(1.0)  # the shared entry has expired; the reader's copy (0.2 s past it) must have too
        assert await client.get(f"{prefix}:{writer.key('request', caller)}") is None
        assert await reader.get("request", caller) is None
    finally:
        await client.aclose()


async def test_an_unanswering_redis_costs_the_cache_one_timeout_then_is_left_alone_for_a_while() -> None:
    """A Redis that accepts connections and never answers: the first cache read waits out the client's timeout and
    is a miss; later reads and writes within `retry_redis_after_s` do not wait on it again (before, every cacheable
    request waited out the timeout twice, its read and its write)."""
    import asyncio
    import socket

    import redis.asyncio as aioredis
    from deepseek_server.auth.tokens import Principal
    from deepseek_server.cache import ResponseCache
    from deepseek_server.request_keys import RequestKeys

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are accepted by the kernel, and nothing is ever read or answered
    client = aioredis.from_url(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=0.5,
                               socket_connect_timeout=0.5)
    try:
        cache = ResponseCache(ttl_s=60, keys=RequestKeys(b"k" * 32), redis=client)  # retried after 5 s
        caller = Principal(uid="u", subject="s", token_id="t", scopes=frozenset(), env="dev", expires_at=0)
        started = time.monotonic()
        assert await cache.get("first", caller) is None
        assert time.monotonic() - started >= 0.4  # waited out the timeout once
        started = time.monotonic()
        for n in range(5):
            assert await cache.get(f"other-{n}", caller) is None
            await cache.put(f"other-{n}", {"answer": n}, caller)
        assert time.monotonic() - started < 0.3  # no more waits
        assert await cache.get("other-3", caller) == {"answer": 3}  # the local entries still serve
    finally:
        await asyncio.wait_for(client.aclose(), 5)
        silent.close()
