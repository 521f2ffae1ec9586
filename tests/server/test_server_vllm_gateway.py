"""`deepseek-server serve --engine vllm`: the gateway in front of a REAL vLLM (CPU build from `make vllm-env`).

One vLLM process serves a tiny Llama for the whole module; the gateway runs in this process with API keys from an
auth directory. The last test kills vLLM, so it stays last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from deepseek_server.app import create_app
from deepseek_server.settings import ServerSettings

from devcluster.testing.model_server import SLOW_REFILL_UID, TOKENS_UID, ServerThread
from devcluster.testing.openai_requests import check, random_request
from devcluster.testing.ports import free_port

MODEL = "tiny-vllm"
MAX_MODEL_LEN = 4096
MESSAGES = [{"role": "user", "content": "Say hello."}]
VLLM_START_TIMEOUT_S = 300


def vllm_python() -> Path:
    from devcluster.vllm_env import is_ready, venv_python

    if not is_ready():
        pytest.fail("vLLM's CPU environment is missing or unfinished: run `make vllm-env` (creates .venv-vllm)")
    return venv_python()


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """vLLM's OpenAI server on a free port, serving a small random Llama (head_dim 32) as MODEL."""
    from deepseek_server.tiny_model import ModelSize, make_tiny_model

    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    # big enough (12M parameters) that a long generation keeps the engine busy for seconds on a CPU
    size = ModelSize(hidden_size=512, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                     intermediate_size=1536)
    model = make_tiny_model("llama", root / "small-llama", max_len=MAX_MODEL_LEN, size=size)
    port = free_port()
    log_path = root / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1"}
    if (os.cpu_count() or 1) > 1:
        # A core for vLLM's HTTP side: with every core busy computing, its streams can reach a client only as they end
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
             "--enforce-eager", "-O0"],  # no torch.compile: the same server, started in about a third of the time
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + VLLM_START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode} while starting:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not healthy within {VLLM_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def gateway(vllm: tuple[str, subprocess.Popen[bytes]], auth_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = ServerSettings(engine="vllm", engine_url=vllm[0], model_name=MODEL, auth_dir=auth_dir,
                              max_new_tokens=100_000, audit_log=tmp_path_factory.mktemp("audit") / "audit.jsonl")
    server = ServerThread(create_app(settings)).start(ready_timeout=120)
    yield server
    server.stop()


@pytest.fixture
def client(gateway: ServerThread, token_factory: Callable[..., str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token_factory(), max_retries=0)


def gauge_value(text: str, name: str) -> float:
    """The sum of a gauge's samples in Prometheus text."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} not in the engine's metrics"
    return sum(values)


def engine_gauge(gateway: ServerThread, name: str) -> float:
    return gauge_value(httpx.get(f"{gateway.url}/metrics/engine", timeout=10).text, name)


def test_chat_and_completion_through_the_gateway(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.model == MODEL
    assert chat.usage is not None and 1 <= chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0
    text = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert text.object == "text_completion"
    assert text.usage is not None and 1 <= text.usage.completion_tokens <= 6


def test_null_parameters_count_as_not_sent(gateway: ServerThread, token_factory: Callable[..., str]) -> None:
    """`null` is "not sent" in OpenAI's API; vLLM itself refuses `"n": null` on /v1/completions (400), so the gateway
    leaves null members out of what it relays."""
    headers = {"authorization": f"Bearer {token_factory()}"}
    nulls = {"n": None, "temperature": None, "top_p": None, "seed": None, "stop": None, "user": None,
             "presence_penalty": None, "logit_bias": None, "response_format": None, "stream_options": None}
    for path, body in (("/v1/completions", {"prompt": "The quick brown fox", "logprobs": None, "echo": None}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": None, "top_logprobs": None,
                                                 "max_completion_tokens": None})):
        for stream in (False, True):
            response = httpx.post(f"{gateway.url}{path}", headers=headers, timeout=60,
                                  json={"model": MODEL, "max_tokens": 3, "stream": stream, **nulls, **body})
            assert response.status_code == 200, (path, stream, response.text)
            if stream:
                assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
            else:
                assert len(response.json()["choices"]) == 1
    # the text of a message may hold the word null: relayed unchanged, and answered
    said = httpx.post(f"{gateway.url}/v1/completions", headers=headers, timeout=60,
                      json={"model": MODEL, "prompt": "null", "max_tokens": 2, "temperature": 0})
    assert said.status_code == 200 and said.json()["usage"]["prompt_tokens"] >= 1


def test_random_parameter_combinations_keep_the_openai_contract(gateway: ServerThread,
                                                                token_factory: Callable[..., str]) -> None:
    """The builtin engine's combination test through the gateway to vLLM (fewer requests: a bigger model on the CPU).
    A 400 here may be vLLM's own (n > 1 with greedy sampling, a logit_bias id past the vocabulary), in its words and
    OpenAI's shape; a stream vLLM refuses after starting it carries the error as an event, in the same shape."""
    rng = random.Random("combinations-vllm")
    requests = [random_request(rng, MODEL) for _ in range(60)]
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {token_factory()}"},
                      timeout=120) as http, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda request: http.post(request[0], json=request[1]), requests))
    for (path, body), response in zip(requests, answers, strict=True):
        check(path, body, response, refused_in_stream=True)
    assert [response.status_code for response in answers].count(200) > len(requests) // 3


def test_prompts_of_token_ids_and_several_prompts_reach_the_engine(client: openai.OpenAI) -> None:
    ids = client.completions.create(model=MODEL, prompt=[71, 112, 230], max_tokens=3, temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3 and len(ids.choices) == 1
    several = client.completions.create(model=MODEL, prompt=["The quick brown fox", "Hello"], n=2, max_tokens=3,
                                        temperature=1.0)  # vLLM takes n > 1 only when sampling
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    tokens = client.completions.create(model=MODEL, prompt=[[71, 112], [230]], max_tokens=3, temperature=0)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 3 and len(tokens.choices) == 2


def test_stream_has_usage_only_when_asked(client: openai.OpenAI) -> None:
    plain = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                stream=True))
    assert plain and all(c.usage is None for c in plain)
    assert all(c.choices for c in plain)  # no usage-only chunk
    asked = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage is not None
    assert asked[-1].usage.completion_tokens >= 1
    assert "".join(c.choices[0].delta.content or "" for c in plain) == \
        "".join(c.choices[0].delta.content or "" for c in asked if c.choices)
    texts = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0,
                                           stream=True))
    assert texts and all(c.usage is None for c in texts)
    # `stream_options` without `include_usage`: no usage, as vLLM answers it (see below)
    unsaid = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={}))  # type: ignore[typeddict-item]
    assert unsaid and all(c.usage is None for c in unsaid)


def test_echo_with_max_tokens_zero_scores_the_prompt_as_vllm_does(client: openai.OpenAI) -> None:
    """vLLM's way to score a prompt (what evaluation harnesses send): the prompt back with its log-probabilities,
    nothing generated."""
    scored = client.completions.create(model=MODEL, prompt="Once upon a time", echo=True, max_tokens=0, logprobs=1)
    assert scored.choices[0].text.startswith("Once upon a time")
    assert scored.choices[0].logprobs is not None and scored.choices[0].logprobs.tokens


def test_stream_options_without_include_usage_get_no_usage_as_from_vllm(vllm: tuple[str, subprocess.Popen[bytes]],
                                                                  gateway: ServerThread,
                                                                  token_factory: Callable[..., str]) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {}}
    direct = httpx.post(f"{vllm[0]}/v1/chat/completions", json=body, timeout=60).text
    relayed = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60,
                         headers={"authorization": f"Bearer {token_factory()}"}).text
    # vLLM's own answer has no usage chunk (its protocol's default for `include_usage` reads true, its answer says
    # otherwise), and the gateway, which always asks vLLM for usage, gives the client what vLLM would have
    assert '"usage":{' not in direct.replace(" ", ""), direct
    assert '"usage":{' not in relayed.replace(" ", ""), relayed


def test_stream_bytes_match_vllm_direct_without_usage(vllm: tuple[str, subprocess.Popen[bytes]],
                                                      gateway: ServerThread,
                                                      token_factory: Callable[..., str]) -> None:
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 5, "temperature": 0, "stream": True}
    direct = httpx.post(f"{vllm[0]}/v1/completions", json=body, timeout=60).text
    relayed = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60,
                         headers={"authorization": f"Bearer {token_factory()}"}).text

    def shape(text: str) -> dict[str, Any]:
        """What a client reads from a stream; vLLM may group tokens into chunks differently from call to call."""
        events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        return {"done": events[-1], "text": "".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
                "usage": [c.get("usage") for c in chunks if "usage" in c],
                "keys": sorted({k for c in chunks for k in c}), "last": {**chunks[-1], "id": 0, "created": 0,
                                                                         "choices": None}}

    assert shape(relayed) == shape(direct)
    assert shape(relayed)["usage"] == [] and shape(relayed)["last"]["system_fingerprint"]


def test_token_limit_counts_the_engines_usage(gateway: ServerThread, token_factory: Callable[..., str]) -> None:
    limited = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token_factory(uid=TOKENS_UID), max_retries=0)
    first = limited.completions.create(model=MODEL, prompt="Count with me", max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert first.usage is not None and first.usage.total_tokens > 40  # over the key's 40 tokens per minute
    with pytest.raises(openai.RateLimitError) as excinfo:
        limited.completions.create(model=MODEL, prompt="again", max_tokens=1)
    assert excinfo.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert excinfo.value.response.headers["retry-after"]


def test_gateway_refuses_401_403_429(gateway: ServerThread, token_factory: Callable[..., str]) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    assert httpx.post(url, json=body, timeout=10).status_code == 401
    no_scope = httpx.post(url, json=body, timeout=10,
                          headers={"authorization": f"Bearer {token_factory(scope=['history:read'])}"})
    assert no_scope.status_code == 403
    limited = {"authorization": f"Bearer {token_factory(uid=SLOW_REFILL_UID)}"}  # burst 3, then 1 per 100 s
    statuses = [httpx.post(url, json=body, timeout=60, headers=limited).status_code for _ in range(5)]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]


def test_engine_4xx_reaches_the_client_unchanged(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=MAX_MODEL_LEN + 100, stream=stream)
        error = excinfo.value.body
        assert isinstance(error, dict) and f"max_model_len={MAX_MODEL_LEN}" in error["message"]
        assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"


def test_a_refusal_the_engine_streams_reads_as_the_same_refusal_unstreamed(client: openai.OpenAI) -> None:
    """vLLM refuses an out-of-vocabulary `logit_bias` with 400 unstreamed, but streamed only after its 200, as an
    error event: through the gateway both carry the same error in OpenAI's shape, which the client raises."""
    bias = {"99999999": 5}
    with pytest.raises(openai.BadRequestError) as unstreamed:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logit_bias=bias)
    with pytest.raises(openai.APIError) as streamed:
        for _ in client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logit_bias=bias, stream=True):
            pass
    assert streamed.value.body == unstreamed.value.body
    assert isinstance(streamed.value.body, dict) and "out-of-vocab" in streamed.value.body["message"]
    assert streamed.value.body["type"] == "invalid_request_error" and streamed.value.body["param"] == "logit_bias"


def test_top_logprobs_need_logprobs_as_vllm_decides(vllm: tuple[str, subprocess.Popen[bytes]],
                                                   client: openai.OpenAI) -> None:
    """The gateway checks `top_logprobs` against `logprobs` as vLLM does: 0 (no alternatives) needs no `logprobs`."""
    for top in (0, 2):
        direct = httpx.post(f"{vllm[0]}/v1/chat/completions", timeout=60,
                            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "top_logprobs": top})
        raw = client.chat.completions.with_raw_response
        try:
            through = raw.create(model=MODEL, messages=MESSAGES, max_tokens=2, top_logprobs=top).status_code
        except openai.BadRequestError as exc:
            through = exc.status_code
        assert (top, through) == (top, direct.status_code), direct.text
        assert through == (200 if top == 0 else 400)


def test_parameters_the_engine_lacks_are_refused_by_name(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logprobs=2, echo=True,
                                      extra_body={"top_k": 3})
    assert reply.choices[0].logprobs is not None  # vLLM's parameters are relayed, not dropped
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"priority": -10})
    assert excinfo.value.body["param"] == "priority"  # type: ignore[index]
    assert excinfo.value.body["code"] == "unsupported_parameter"  # type: ignore[index]


def test_deterministic_repeat_is_a_cache_hit(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, max_tokens=7, temperature=0, user="vllm-cache")
    first = client.chat.completions.with_raw_response.create(**kwargs)
    second = client.chat.completions.with_raw_response.create(**kwargs)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    assert first.parse().id != second.parse().id


def test_audit_and_history_carry_the_engines_usage(client: openai.OpenAI, gateway: ServerThread,
                                                   token_factory: Callable[..., str]) -> None:
    reply = client.completions.create(model=MODEL, prompt="Audit me", max_tokens=4, temperature=0.5)
    assert reply.usage is not None
    history = httpx.get(f"{gateway.url}/v1/history?limit=1", timeout=10,
                        headers={"authorization": f"Bearer {token_factory()}"}).json()["data"]
    assert history[0]["prompt_tokens"] == reply.usage.prompt_tokens
    assert history[0]["completion_tokens"] == reply.usage.completion_tokens
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert re.search(r'^deepseek_api_requests_total\{route="/v1/completions",status="200"\} ', metrics, re.M)


def test_engine_metrics_are_served_on_the_gateway_port(gateway: ServerThread) -> None:
    response = httpx.get(f"{gateway.url}/metrics/engine", timeout=10)
    assert response.status_code == 200
    assert "vllm:num_requests_running" in response.text
    assert response.headers["content-type"].startswith("text/plain")


def wait_for_gauge(gateway: ServerThread, check: Callable[[float], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check(engine_gauge(gateway, "vllm:num_requests_running")):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def generated_tokens(gateway: ServerThread) -> float:
    return engine_gauge(gateway, "vllm:generation_tokens_total")


def leave_early(gateway: ServerThread, attempt: Callable[[], str], max_tokens: int) -> None:
    """Run `attempt` (a client that leaves mid-answer; it returns what it saw) until the engine stops early: it
    generated fewer than `max_tokens` tokens. Up to 3 attempts: vLLM's CPU build on a busy machine sometimes sends a
    whole answer only as it ends (its HTTP side starved by the computing), and there is nothing left to stop then. A
    gateway that does not pass the client's leaving on fails every attempt."""
    attempts = []
    for _ in range(3):
        wait_for_gauge(gateway, lambda running: running == 0, "the engine is busy before the attempt", 60)
        before = generated_tokens(gateway)
        saw = attempt()
        wait_for_gauge(gateway, lambda running: running == 0, "the engine kept generating after the client left", 60)
        generated = generated_tokens(gateway) - before
        if generated < max_tokens:
            return
        attempts.append(f"{generated:g} tokens generated; the client saw {saw}")
    pytest.fail(f"the engine generated every token for clients that left: {attempts}")


def test_client_disconnect_aborts_the_engine_request(gateway: ServerThread,
                                                     token_factory: Callable[..., str]) -> None:
    """A client that leaves mid-answer stops the engine's work on it, streamed or not: the engine generates fewer
    than the request's tokens (all of them take it 10-45 s).

    The evidence is the engine's own token counter, read once the request is gone: a running-requests gauge
    sampled while the request runs can miss a request that the machine finishes between two samples."""
    max_tokens = MAX_MODEL_LEN - 20
    body = {"model": MODEL, "prompt": "Go on and on", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    headers = {"authorization": f"Bearer {token_factory()}"}

    def stream_then_leave() -> str:
        """Reads the stream's first piece, then goes away."""
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60,
                          headers=headers) as response:
            assert response.status_code == 200, response.read().decode()[:500]
            first = next(response.iter_raw())
        assert first.startswith(b"data: {") and b'"text"' in first, first[:300]
        return f"{first.count(b'data: ')} events in its first read"

    leave_early(gateway, stream_then_leave, max_tokens)

    def call_then_give_up() -> str:
        """A non-streamed call whose client gives up once the engine has started generating."""
        async def give_up() -> str:
            async with httpx.AsyncClient(timeout=60) as http:
                async def generated() -> float:  # read without blocking the loop that sends the call
                    return gauge_value((await http.get(f"{gateway.url}/metrics/engine")).text,
                                       "vllm:generation_tokens_total")

                start = await generated()
                call = asyncio.create_task(http.post(f"{gateway.url}/v1/completions",
                                                     json={**body, "stream": False}, headers=headers))
                deadline = time.monotonic() + 60
                while await generated() == start and not call.done():
                    assert time.monotonic() < deadline, "the engine generated nothing for the call within 60 s"
                    await asyncio.sleep(0.1)
                if call.done():
                    answer = call.result()
                    return f"the whole answer (HTTP {answer.status_code}) before it could leave"
                call.cancel()  # closes the client's connection to the gateway
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                return "the engine generating, and left"

        return asyncio.run(give_up())

    leave_early(gateway, call_then_give_up, max_tokens)


def test_zz_dead_engine_makes_the_gateway_unready_and_answer_503_quickly(
        vllm: tuple[str, subprocess.Popen[bytes]], gateway: ServerThread, client: openai.OpenAI) -> None:
    """Kills the module's vLLM: keep this test last."""
    # an earlier test's broken connection may have asked for a re-check: start from a ready gateway
    deadline = time.monotonic() + 30
    while httpx.get(f"{gateway.url}/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the gateway is not ready before the engine is killed"
        time.sleep(0.2)
    proc = vllm[1]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    killed = time.monotonic()
    with pytest.raises(openai.APIStatusError) as excinfo:  # the first call finds the engine gone
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert time.monotonic() - killed < 10  # not the 600 s read timeout
    assert excinfo.value.status_code == 503
    assert excinfo.value.response.headers["retry-after"]
    while httpx.get(f"{gateway.url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() - killed < 15, "/ready still 200 fifteen seconds after the engine died"
        time.sleep(0.1)
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200
    started = time.monotonic()
    response = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=10,
                          json={"model": MODEL, "messages": MESSAGES},
                          headers={"authorization": f"Bearer {client.api_key}"})
    assert time.monotonic() - started < 5  # answered without trying the engine's connect and read timeouts
    assert response.status_code == 503 and response.headers["retry-after"]
