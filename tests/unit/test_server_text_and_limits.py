"""Pure pieces of the server: streamed text with stop strings, limit arithmetic, headers, fingerprints."""

from __future__ import annotations

import json
import math

import pytest
from deepseek_server.cache import is_deterministic
from deepseek_server.engine.text_assembly import TextAssembler
from deepseek_server.limits import gcra
from deepseek_server.limits.decision import Decision, format_duration
from deepseek_server.limits.memory_store import MemoryLimitStore
from deepseek_server.limits.policy import KeyLimits
from deepseek_server.request_keys import RequestKeys

# one "token" per character makes the assembler's behaviour easy to read
VOCAB = {i: ch for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz .!")}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def ids(text: str) -> list[int]:
    reverse = {v: k for k, v in VOCAB.items()}
    return [reverse[c] for c in text]


def run(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    assembler = TextAssembler(decode, stop)
    pieces = []
    for token in ids(text):
        pieces.append(assembler.add(token))
        if assembler.stopped:
            return pieces, True
    pieces.append(assembler.finish())
    return pieces, False


def test_without_stops_every_token_is_released_at_once() -> None:
    pieces, stopped = run("hello", ())
    assert pieces == ["h", "e", "l", "l", "o", ""] and not stopped


def test_stop_string_is_cut_and_never_emitted() -> None:
    pieces, stopped = run("hello world. more", ("world",))
    assert stopped and "".join(pieces) == "hello "


def test_a_possible_stop_prefix_is_held_back_then_released() -> None:
    pieces, stopped = run("ab abc", ("abd",))
    assert not stopped
    assert "".join(pieces) == "ab abc"
    assert pieces[0] == "" and pieces[1] == ""  # "a", "ab" could start "abd"


def test_earliest_of_several_stops_wins() -> None:
    pieces, stopped = run("one two three", ("three", "two"))
    assert stopped and "".join(pieces) == "one "


def test_incomplete_utf8_is_held_until_complete() -> None:
    table = {1: b"\xe4", 2: b"\xbd", 3: b"\xa0", 4: b"!"}
    assembler = TextAssembler(lambda t: b"".join(table[i] for i in t).decode("utf-8", "replace"), ())
    assert [assembler.add(i) for i in (1, 2, 3, 4)] == ["", "", "你", "!"]


def test_gcra_admits_the_burst_then_the_rate() -> None:
    limits = KeyLimits(rps=2, burst=3)
    tat, now, admitted = None, 100.0, []
    for _ in range(5):
        check = gcra.check_request(tat, now, limits)
        admitted.append(check.allowed)
        if check.allowed:
            tat = check.new_tat
    assert admitted == [True, True, True, False, False]
    refused = gcra.check_request(tat, now, limits)
    assert refused.retry_after_s == pytest.approx(0.5)
    assert gcra.check_request(tat, now + 0.5, limits).allowed
    assert gcra.remaining_requests(tat, now + 10, limits) == 3


def test_burst_zero_still_admits_one_request() -> None:
    limits = KeyLimits(rps=1, burst=0)
    first = gcra.check_request(None, 0.0, limits)
    assert first.allowed and not gcra.check_request(first.new_tat, 0.0, limits).allowed


def test_tokens_per_minute_debt() -> None:
    limits = KeyLimits(rps=100, burst=100, tpm=60)
    assert gcra.check_tokens(None, 0.0, limits) == (True, 0.0)
    token_tat = gcra.charge_tokens(None, 0.0, 100, limits)  # overshoot: 100 tokens of a 60 budget
    allowed, retry = gcra.check_tokens(token_tat, 0.0, limits)
    assert not allowed and retry == pytest.approx(41.0)
    assert gcra.check_tokens(token_tat, 41.0, limits)[0]
    assert gcra.remaining_tokens(token_tat, 100.0, limits) == 60
    assert gcra.check_tokens(None, 0.0, KeyLimits(rps=1, burst=1)) == (True, 0.0)


def test_a_changed_tokens_per_minute_limit_applies_from_the_next_request() -> None:
    clock = [0.0]
    store = MemoryLimitStore(clock=lambda: clock[0])
    low, high = KeyLimits(rps=100, burst=100, tpm=20), KeyLimits(rps=100, burst=100, tpm=10_000)
    assert store.acquire("k", low, reserve_tokens=13).allowed
    assert store.acquire("k", low, reserve_tokens=13).allowed  # 26 of 20: over budget
    assert not store.acquire("k", low).allowed
    # Raised: the 26 tokens outstanding are 26 of 10,000, not 78 s of a minute's budget.
    raised = store.acquire("k", high, reserve_tokens=13)
    assert raised.allowed and raised.remaining_tokens == 10_000 - 39
    store.release("k", high, tokens_used=3, reserved=13)
    assert store.acquire("k", high).remaining_tokens == 10_000 - 29
    # Lowered again: 29 tokens outstanding of 20 is over budget at once.
    assert not store.acquire("k", low).allowed


def test_memory_store_parallel_limit_and_release() -> None:
    clock = [0.0]
    store = MemoryLimitStore(clock=lambda: clock[0])
    limits = KeyLimits(rps=100, burst=100, parallel=1)
    assert store.acquire("k", limits).allowed
    blocked = store.acquire("k", limits)
    assert not blocked.allowed and blocked.kind == "parallel"
    assert store.acquire("other", limits).allowed  # keys are independent
    store.release("k", limits, 0)
    assert store.acquire("k", limits).allowed


def test_memory_store_answers_what_the_gcra_functions_say() -> None:
    """For a key with only a request rate, the answer is what gcra.check_request and gcra.remaining_requests give for
    the same state, through the burst and into refusals."""
    clock = [50.0]
    store = MemoryLimitStore(clock=lambda: clock[0])
    limits = KeyLimits(rps=4, burst=3)
    tat: float | None = None
    for step in range(12):
        clock[0] += 0.1 if step % 3 else 0.0
        decision = store.acquire("k", limits)
        allowed, new_tat, retry = gcra.check_request(tat, clock[0], limits)
        assert decision.allowed == allowed and decision.retry_after_s == pytest.approx(retry)
        if allowed:
            tat = new_tat
        assert decision.remaining_requests == gcra.remaining_requests(tat, clock[0], limits)
        assert decision.reset_requests_s == pytest.approx(max((tat or clock[0]) - clock[0], 0.0))
        assert decision.kind == (None if allowed else "requests")


@pytest.mark.parametrize("rps, burst", [(4, 3), (0.5, 1), (1000, 5)])
def test_request_rate_fast_path_gives_the_headers_of_a_full_admission(rps: float, burst: int) -> None:
    """`admit_request` (keys with only a request rate, the common case) admits and refuses exactly as `acquire`
    does on the same state, and its headers are the admitted decision's, byte for byte."""
    clock = [50.0]
    fast, full = MemoryLimitStore(clock=lambda: clock[0]), MemoryLimitStore(clock=lambda: clock[0])
    limits = KeyLimits(rps=rps, burst=burst)
    answers = []
    for step in range(40):
        clock[0] += (0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.3, 1.7)[step % 8]  # bursts of six at one instant
        headers = fast.admit_request("k", limits)
        decision = full.acquire("k", limits)
        assert (headers is not None) == decision.allowed
        if headers is not None:
            assert headers == decision.raw_headers()
        answers.append(decision.allowed)
    assert True in answers and False in answers  # through the burst and into refusals, for every rate here


def test_only_keys_with_a_parallel_limit_are_counted_in_flight() -> None:
    """As in Redis: a request admitted while its key had no `parallel` limit holds no slot, so a limit added while
    it runs counts only the requests admitted after it."""
    store = MemoryLimitStore(clock=lambda: 0.0)
    unlimited, one = KeyLimits(rps=100, burst=100), KeyLimits(rps=100, burst=100, parallel=1)
    assert store.acquire("k", unlimited).allowed
    assert store.acquire("k", one).allowed
    assert not store.acquire("k", one).allowed
    store.release("k", unlimited, 0)  # the first request ends: it held no slot, so none is freed
    assert not store.acquire("k", one).allowed
    store.release("k", one, 0)
    assert store.acquire("k", one).allowed


def test_reset_under_a_second_is_whole_milliseconds_rounded_up() -> None:
    for millis in range(1000):
        for seconds in (millis / 1000, (millis + 0.001) / 1000, (millis + 0.999) / 1000):
            if seconds < 1:
                assert format_duration(seconds) == f"{max(math.ceil(seconds * 1000), 0)}ms", seconds
    assert format_duration(-0.5) == "0ms"


def test_raw_headers_are_the_headers_as_bytes() -> None:
    limits = KeyLimits(rps=10, burst=20, tpm=1000)
    for decision in (Decision(True, limits, remaining_requests=19, reset_requests_s=0.0101, remaining_tokens=900,
                              reset_tokens_s=61.5),
                     Decision(False, KeyLimits(rps=0.01, burst=1), kind="requests", retry_after_s=99.5,
                              reset_requests_s=100.0, extra_headers={"x-ratelimit-backend": "memory-fallback"})):
        raw = decision.raw_headers()
        assert all(isinstance(name, bytes) and isinstance(value, bytes) for name, value in raw)
        assert {name.decode(): value.decode() for name, value in raw} == decision.headers()
    assert dict(raw)[b"x-ratelimit-reset-requests"] == b"1m40s"


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (0.0, "0ms"), (1.0, "1s"), (1.5, "1.5s"),
                                               (360.0, "6m0s"), (61.25, "1m1.25s")])
def test_reset_durations_in_openai_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_decision_headers() -> None:
    limits = KeyLimits(rps=10, burst=20, tpm=1000)
    ok = Decision(True, limits, remaining_requests=19, reset_requests_s=0.1, remaining_tokens=900,
                  reset_tokens_s=6.0)
    assert ok.headers() == {"x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "19",
                            "x-ratelimit-reset-requests": "100ms", "x-ratelimit-limit-tokens": "1000",
                            "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6s"}
    refused = Decision(False, KeyLimits(rps=1, burst=1), kind="requests", retry_after_s=0.2)
    assert refused.headers()["retry-after"] == "1" and refused.headers()["retry-after-ms"] == "200"


@pytest.mark.parametrize("doc", [None, {"rps": 0, "burst": 1}, {"rps": 1, "burst": -1}, {"rps": "1", "burst": 1},
                                 {"rps": 1, "burst": 1, "tpm": 0}, {"rps": 1, "burst": 1, "parallel": 1.5}])
def test_bad_limits_are_refused_with_the_location(doc: object) -> None:
    with pytest.raises(ValueError, match=r"limits\.json\[u\]"):
        KeyLimits.from_document(doc, "limits.json[u]")


def test_fingerprint_ignores_transport_fields_only() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    request_fingerprint = RequestKeys(b"k" * 32).request_fingerprint
    same = request_fingerprint("chat", {**body, "stream": False, "user": "x"})
    assert request_fingerprint("chat", body) == same
    assert request_fingerprint("chat", {**body, "temperature": 0.5}) != same
    assert request_fingerprint("text", body) != same
    assert is_deterministic(0.0, None) and is_deterministic(1.0, 5)
    assert not is_deterministic(None, None) and not is_deterministic(0.7, None)


def test_sse_events_never_contain_unicode_line_breaks() -> None:
    from deepseek_server.response_bodies import chunk, sse

    event = sse(chunk("chat", "id", 0, "m", 0, text="a\u2028b\x85c\u2029d\r\ne 你好"))
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):])["choices"][0]["delta"]["content"] == "a\u2028b\x85c\u2029d\r\ne 你好"


def test_decoding_is_incremental_not_quadratic() -> None:
    decoded = [0]

    def counting_decode(token_ids: list[int]) -> str:
        decoded[0] += len(token_ids)
        return decode(token_ids)

    assembler = TextAssembler(counting_decode, ("zzz",))
    text = "".join(assembler.add(t) for t in ids("hello world " * 200)) + assembler.finish()
    assert text == "hello world " * 200
    assert decoded[0] < 10 * 2400  # whole-sequence decoding would be ~2.9 million


async def test_response_cache_ttl_and_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_server import cache as cache_module
    from deepseek_server.cache import ResponseCache

    now = [1000.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    from deepseek_server.auth.tokens import Principal

    caller = Principal(uid="u", subject="s", token_id="t", scopes=frozenset(), env="dev", expires_at=0)
    cache = ResponseCache(ttl_s=10, keys=RequestKeys(b"k" * 32), max_entries=2)
    await cache.put("a", {"v": 1}, caller)
    await cache.put("b", {"v": 2}, caller)
    assert await cache.get("a", caller) == {"v": 1}  # "a" is now the most recent
    await cache.put("c", {"v": 3}, caller)  # evicts the least recent: "b"
    assert await cache.get("b", caller) is None and await cache.get("c", caller) == {"v": 3}
    now[0] += 11
    assert await cache.get("a", caller) is None  # past its TTL


def test_a_key_with_burst_one_is_admitted_once_an_interval_at_epoch_clock_times() -> None:
    """At seconds since 1970 (Redis's clock) a double's step is 2.4e-7 s: the admission's margin must exceed it, or
    `(now + interval) - now` reads as one interval too many and the key is refused for good."""
    for rps in (3, 5, 6, 9, 13, 3000):
        limits = KeyLimits(rps=rps, burst=1)
        clock = [1_764_990_000.123456]
        store = MemoryLimitStore(clock=lambda clock=clock: clock[0])
        tat, admitted, admitted_here = None, 0, 0
        for _ in range(20):
            check = gcra.check_request(tat, clock[0], limits)
            if check.allowed:
                admitted, tat = admitted + 1, check.new_tat
                assert gcra.remaining_requests(tat, clock[0], limits) == 0
            admitted_here += store.admit_request("u", limits) is not None
            clock[0] += 1.0
        assert (admitted, admitted_here) == (20, 20), rps


def test_a_reservation_the_minute_has_already_drained_is_not_refunded() -> None:
    """A request that ends after its reservation drained out of the minute gets back only what is still outstanding:
    refunding all of its unused reservation cancelled newer requests' reservations, and keys with requests that wait
    a minute (for memory, or relayed) could use about twice their tokens per minute."""
    from deepseek_server.limits.limiter import RateLimiter

    limits = KeyLimits(rps=1000, burst=1000, tpm=1000)
    limiter = RateLimiter()
    quick = limiter.acquire_now("u", limits, 100)
    assert limiter.release_now(quick, 0)  # ended at once: all 100 back
    assert limiter.acquire_now("u", limits, 0, hold=False).decision.remaining_tokens == 1000
    slow = limiter.acquire_now("u", limits, 100)
    slow.admitted_at -= 61  # admitted more than a minute ago: its 100 tokens drained since
    assert slow.settled_reservation(0) == 0 and slow.settled_reservation(150) == 100
    assert limiter.release_now(slow, 0)
    assert limiter.acquire_now("u", limits, 0, hold=False).decision.remaining_tokens == 900
    half = limiter.acquire_now("v", limits, 100)
    half.admitted_at -= 3  # 50 of its 100 tokens drained: 50 of the unused 80 come back
    assert half.settled_reservation(20) == 70
    # admitted behind another request's 900: this reservation drains only after those, so after a minute 900 of
    # its 1000 are still outstanding, and come back unused
    ahead = limiter.acquire_now("w", limits, 900)
    behind = limiter.acquire_now("w", limits, 1000)
    ahead.admitted_at -= 60
    behind.admitted_at -= 60
    assert ahead.settled_reservation(900) == 900 and behind.settled_reservation(0) == 900
