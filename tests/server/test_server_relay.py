"""The gateway's relay to an OpenAI engine server, against a small stand-in engine over real HTTP (fast; the same
behaviour against a real vLLM is in test_server_vllm_gateway.py), and the lean install of the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deepseek_server.app import create_app
from deepseek_server.relay import _asking_for_usage
from deepseek_server.schemas import CompletionRequest
from deepseek_server.settings import ServerSettings
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from devcluster.testing.model_server import TOKENS_UID, ServerThread, SigningKey, mint, write_auth_dir
from devcluster.testing.polling import wait_for
from devcluster.testing.ports import free_port

MODEL = "standin"


# what vLLM streams for a request it refuses only once its stream has begun (an out-of-vocabulary logit_bias)
LATE_REFUSAL = (b'data: {"error": {"message": "token_id(s) [99999999] in logit_bias contain out-of-vocab token ids. '
                b'Vocabulary size: 384 (parameter=logit_bias, value=[99999999])", "type": "BadRequestError", '
                b'"param": "logit_bias", "code": 400}}\n\n')
MIDWAY_FAILURE = (b'data: {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", '
                  b'"param": null, "code": 500}}\n\n')


class StandInEngine:
    """Speaks vLLM's OpenAI dialect: compact JSON, usage only when asked, 400 for too many tokens."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.running = 0
        self.waiting = 0
        self.aborted = 0
        self.holding = 0  # requests held before their answer starts ("hold the headers")
        self.health_delay_s = 0.0  # how long /health takes (a busy engine)
        self.metrics_stall_s = 0.0  # how long /metrics stops after its first line (a hung engine)
        self.app = FastAPI()
        app = self.app

        @app.get("/health")
        async def health() -> PlainTextResponse:
            await asyncio.sleep(self.health_delay_s)
            return PlainTextResponse("")

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 128}]}

        @app.get("/metrics")
        async def metrics() -> Any:
            lines = [f"vllm:num_requests_running {self.running}\n",
                     f'vllm:num_requests_waiting{{model_name="{MODEL}"}} {self.waiting}\n']
            if not self.metrics_stall_s:
                return PlainTextResponse("".join(lines))

            async def stalling() -> AsyncIterator[str]:
                yield lines[0]
                await asyncio.sleep(self.metrics_stall_s)
                yield lines[1]

            return StreamingResponse(stalling(), media_type="text/plain")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self.answer(request, "text_completion")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await self.answer(request, "chat.completion")

    async def answer(self, request: Request, obj: str) -> Any:
        body = await request.json()
        self.requests.append(body)
        if body.get("prompt") == "hold the headers":  # an engine that has the request but has not answered yet
            self.holding += 1
            try:
                while not await request.is_disconnected():
                    await asyncio.sleep(0.02)
                self.aborted += 1
            finally:
                self.holding -= 1
            return PlainTextResponse("", status_code=500)
        if body.get("prompt") in ("answer 500", "answer 503"):  # vLLM's failure, and its overloaded or starting engine
            status = int(str(body["prompt"]).split()[1])
            return JSONResponse({"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError",
                                           "param": None, "code": status}}, status_code=status)
        max_tokens = body.get("max_tokens", 16)
        if max_tokens > 100:
            return JSONResponse({"error": {"message": f"max_tokens {max_tokens} is too large", "type":
                                           "BadRequestError", "param": "max_tokens", "code": 400}}, status_code=400)
        words = ["w"] * max_tokens
        prompt_tokens = max(3, len(str(body.get("prompt", "")).split()))  # a word a token; "hi" and chats: 3
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        if not body.get("stream"):
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                                       "finish_reason": "length"} if obj == "chat.completion"
                                      else {"index": 0, "text": " ".join(words), "finish_reason": "length"})
            return {"id": "x", "object": obj, "created": 1, "model": MODEL, "choices": [choice], "usage": usage}
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        delay = 0.05 if str(body.get("prompt", "")).startswith("slowly") else 0.0
        if str(body.get("prompt", "")).startswith("refuse late"):  # vLLM's bytes for a refusal after the 200
            return StreamingResponse(iter([LATE_REFUSAL, b"data: [DONE]\n\n"]), media_type="text/event-stream")
        fails_after = 3 if str(body.get("prompt", "")).startswith("fail midway") else None
        # an engine that dies (its connection closed mid-body) or hangs after two words
        cut_after = 2 if str(body.get("prompt", "")).startswith(("drop midway", "stall midway")) else None
        stall = str(body.get("prompt", "")).startswith("stall midway")

        async def events() -> AsyncIterator[bytes]:
            self.running += 1
            try:
                for index, word in enumerate(words):
                    if index == fails_after:
                        yield MIDWAY_FAILURE
                        yield b"data: [DONE]\n\n"
                        return
                    if index == cut_after:
                        if stall:
                            await asyncio.sleep(30)
                        raise RuntimeError("the stand-in engine died midway")
                    await asyncio.sleep(delay)
                    chunk = {"id": "x", "object": obj + ".chunk", "created": 1, "model": MODEL,
                             "choices": [{"index": 0, "delta": {"content": word}}]}
                    if include_usage:
                        chunk["usage"] = None
                    yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
                if include_usage:
                    last = {"id": "x", "object": obj + ".chunk", "created": 1, "model": MODEL, "choices": [],
                            "usage": usage}
                    yield b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            except asyncio.CancelledError:
                self.aborted += 1
                raise
            finally:
                self.running -= 1

        return StreamingResponse(events(), media_type="text/event-stream")


def serve(engine: StandInEngine) -> ServerThread:
    """The stand-in on a port of its own, once its /health answers."""
    server = ServerThread(engine.app)
    server.thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{server.url}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    return server


@pytest.fixture(scope="module")
def standin() -> Iterator[tuple[StandInEngine, ServerThread]]:
    engine = StandInEngine()
    server = serve(engine)
    yield engine, server
    server.stop()


@pytest.fixture(scope="module")
def gateway(standin: tuple[StandInEngine, ServerThread], auth_dir: Path) -> Iterator[ServerThread]:
    settings = ServerSettings(engine="vllm", engine_url=standin[1].url, model_name=MODEL, auth_dir=auth_dir,
                              max_new_tokens=1000)
    server = ServerThread(create_app(settings)).start(ready_timeout=30)
    yield server
    server.stop()


class StallingRelay:
    """A TCP relay to an engine that can stop completing new connections, as a node too busy to finish a handshake in
    time does: while stalled, its accept queue is shrunk to one and filled, so the kernel drops a new connection's SYN
    and the connect waits; the connections it was relaying are closed."""

    def __init__(self, target: str) -> None:
        address = target.removeprefix("http://").rsplit(":", 1)
        self.target = (address[0], int(address[1]))
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.links: set[socket.socket] = set()
        self.fillers: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stalled, self.paused, self.closed = threading.Event(), threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            if self.stalled.is_set():
                self.paused.set()
                time.sleep(0.02)
                continue
            self.paused.clear()
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.links.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def stall(self) -> None:
        self.stalled.set()
        assert self.paused.wait(5)
        self.listener.listen(0)
        with self.lock:
            for link in self.links:
                with contextlib.suppress(OSError):
                    link.shutdown(socket.SHUT_RDWR)
            self.links.clear()
        while True:  # fill the accept queue until a connection is not made
            filler = socket.socket()
            filler.settimeout(0.2)
            try:
                filler.connect(self.listener.getsockname())
            except TimeoutError:
                filler.close()
                return
            self.fillers.append(filler)

    def resume(self) -> None:
        self.listener.listen(128)
        self.stalled.clear()
        for filler in self.fillers:
            filler.close()
        self.fillers.clear()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        with self.lock:
            for link in self.links:
                link.close()


def _auth(token_factory: Callable[..., str], **claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token_factory(**claims)}"}


def _events(text: str) -> list[Any]:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.split("\n\n") if line.startswith("data: ")]


def test_stream_without_usage_is_what_the_engine_sends_without_it(
        standin: tuple[StandInEngine, ServerThread], gateway: ServerThread,
        token_factory: Callable[..., str]) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}
    relayed = httpx.post(f"{gateway.url}/v1/completions", json=body, headers=_auth(token_factory), timeout=10)
    assert relayed.status_code == 200
    assert standin[0].requests[-1]["stream_options"] == {"include_usage": True}  # the gateway always asks
    direct = httpx.post(f"{standin[1].url}/v1/completions", json=body, timeout=10)
    assert relayed.text == direct.text
    assert "usage" not in relayed.text


def test_stream_with_usage_passes_through(gateway: ServerThread, token_factory: Callable[..., str]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    events = _events(httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=_auth(token_factory),
                                timeout=10).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert all(e["usage"] is None for e in events[:-2])


def test_engine_4xx_keeps_its_status_in_openai_shape(gateway: ServerThread,
                                                      token_factory: Callable[..., str]) -> None:
    for stream in (False, True):
        response = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                              json={"model": MODEL, "prompt": "hi", "max_tokens": 500, "stream": stream})
        assert response.status_code == 400
        assert response.json()["error"] == {"message": "max_tokens 500 is too large",
                                            "type": "invalid_request_error", "param": "max_tokens", "code": None}
        assert response.headers["x-ratelimit-limit-requests"] == "1000"  # admitted before the engine refused it


def test_engine_5xx_is_a_502_or_a_503_with_retry_after_in_openai_shape(gateway: ServerThread,
                                                                          token_factory: Callable[..., str]) -> None:
    """vLLM's 503 (overloaded, starting) stays a 503 with `Retry-After`, so clients back off and retry; any other
    5xx is the gateway's upstream failing: 502 `engine_error`. Streamed or not, the engine answered before any 200."""
    for stream in (False, True):
        failed = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                            json={"model": MODEL, "prompt": "answer 500", "stream": stream})
        assert failed.status_code == 502
        assert failed.json()["error"] == {"message": "The inference engine failed: EngineCore encountered an issue.",
                                          "type": "server_error", "param": None, "code": "engine_error"}
        busy = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                          json={"model": MODEL, "prompt": "answer 503", "stream": stream})
        assert busy.status_code == 503 and busy.headers["retry-after"]
        assert busy.json()["error"]["code"] == "engine_unavailable"
        assert busy.json()["error"]["type"] == "server_error"


def test_a_length_over_the_ceiling_is_refused_under_the_name_sent(gateway: ServerThread,
                                                                   token_factory: Callable[..., str]) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        response = httpx.post(f"{gateway.url}/v1/chat/completions", headers=_auth(token_factory), timeout=10,
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], name: 1001})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == name and error["message"].startswith(f"{name} is too large: 1001."), error


def test_unsupported_parameters_are_refused_by_name(gateway: ServerThread,
                                                    token_factory: Callable[..., str]) -> None:
    ok = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "top_k": 5, "echo": True})
    assert ok.status_code == 200, ok.text  # vLLM's own parameters are relayed
    refused = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                         json={"model": MODEL, "prompt": "hi", "priority": 5})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "priority"
    assert refused.json()["error"]["code"] == "unsupported_parameter"
    # chat's, not completions': vLLM's completion request has no such field and would drop it without a word
    for name, value in (("top_logprobs", 2), ("bad_words", ["x"])):
        dropped = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                             json={"model": MODEL, "prompt": "hi", "logprobs": 2, name: value})
        assert dropped.status_code == 400, (name, dropped.text)
        assert dropped.json()["error"]["param"] == name
        assert dropped.json()["error"]["code"] == "unsupported_parameter"


def test_echo_with_max_tokens_zero_is_relayed_and_zero_without_echo_is_refused(
        standin: tuple[StandInEngine, ServerThread], gateway: ServerThread,
        token_factory: Callable[..., str]) -> None:
    """`echo` with `max_tokens: 0` is vLLM's way to score a prompt (its log-probabilities, nothing generated; what
    evaluation harnesses send): relayed as sent. Without `echo`, 0 is refused as before."""
    scored = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                        json={"model": MODEL, "prompt": "score me", "echo": True, "max_tokens": 0, "logprobs": 1})
    assert scored.status_code == 200, scored.text
    assert standin[0].requests[-1]["max_tokens"] == 0 and standin[0].requests[-1]["echo"] is True
    refused = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                         json={"model": MODEL, "prompt": "hi", "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens", refused.text


def test_echo_with_max_tokens_zero_reserves_the_prompt_alone(standin: tuple[StandInEngine, ServerThread],
                                                              tmp_path: Path) -> None:
    """A scoring request generates nothing: its tokens-per-minute reservation is its prompt's bound, not the prompt
    plus `--max-new-tokens` (0 was read as "not sent")."""
    key = SigningKey(kid="echo-key")
    auth = write_auth_dir(tmp_path / "auth", [key], default_limits={"rps": 100, "burst": 100, "tpm": 100_000,
                                                                      "parallel": None})
    settings = ServerSettings(engine="vllm", engine_url=standin[1].url, model_name=MODEL, auth_dir=auth,
                              max_new_tokens=1000)
    server = ServerThread(create_app(settings)).start(ready_timeout=30)
    try:
        body = json.dumps({"model": MODEL, "prompt": "score me", "echo": True, "max_tokens": 0}).encode()
        scored = httpx.post(f"{server.url}/v1/completions", content=body, timeout=10,
                            headers={"authorization": f"Bearer {mint(key, uid='uid-echo')}",
                                     "content-type": "application/json"})
        assert scored.status_code == 200, scored.text
        reserved = 100_000 - int(scored.headers["x-ratelimit-remaining-tokens"])
        assert reserved <= len(body), reserved  # at most a token a byte of the body; 1,000 more before
    finally:
        server.stop()


def test_a_json_schema_without_schema_is_refused_by_name_before_the_engine(
        standin: tuple[StandInEngine, ServerThread], gateway: ServerThread,
        token_factory: Callable[..., str]) -> None:
    """vLLM refuses it too, with a 400 naming no parameter ("You must use one kind of structured outputs
    constraint but none are specified: {...}"); the gateway names it, as the builtin engine does."""
    sent = len(standin[0].requests)
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers=_auth(token_factory), timeout=10,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("response_format.json_schema.schema", "missing_required_parameter")
    assert len(standin[0].requests) == sent


def test_token_limit_counts_engine_usage(gateway: ServerThread, token_factory: Callable[..., str]) -> None:
    headers = _auth(token_factory, uid=TOKENS_UID)  # 40 tokens per minute
    first = httpx.post(f"{gateway.url}/v1/completions", headers=headers, timeout=10,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 50, "stream": True})
    assert first.status_code == 200
    second = httpx.post(f"{gateway.url}/v1/completions", headers=headers, timeout=10,
                        json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"


def test_parallel_requests_cannot_spend_the_token_budget_on_prompts(
        standin: tuple[StandInEngine, ServerThread], tmp_path: Path, signing_key: SigningKey) -> None:
    """The engine counts the prompt, but the budget is checked at admission: requests that reserved only their
    max_tokens all got in at once, and together spent many times the key's tokens per minute on their prompts."""
    uid, tpm = "uid-prompt-burst", 40
    auth = write_auth_dir(tmp_path / "auth", [signing_key],
                          limits={uid: {"rps": 100, "burst": 100, "tpm": tpm, "parallel": None}})
    settings = ServerSettings(engine="vllm", engine_url=standin[1].url, model_name=MODEL, auth_dir=auth,
                              max_new_tokens=1000, no_cache=True)
    server = ServerThread(create_app(settings)).start(ready_timeout=30)
    headers = {"authorization": f"Bearer {mint(signing_key, uid=uid)}"}
    body = {"model": MODEL, "prompt": "slowly " + "w " * 59, "max_tokens": 2, "stream": True}  # 60 prompt tokens

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(*[http.post(f"{server.url}/v1/completions", json=body, headers=headers)
                                          for _ in range(6)])

    try:
        answers = asyncio.run(burst())
    finally:
        server.stop()
    admitted = [a for a in answers if a.status_code == 200]
    assert admitted and all(a.status_code == 429 for a in answers if a.status_code != 200), answers
    spent = len(admitted) * (60 + 2)
    # at most one request's reservation (its body's size and max_tokens) beyond the budget, as for the builtin engine
    assert spent <= tpm + len(json.dumps(body)) + 2, f"{len(admitted)} of 6 admitted: {spent} tokens of {tpm}"


def test_client_disconnect_aborts_the_engine_request(standin: tuple[StandInEngine, ServerThread],
                                                     gateway: ServerThread,
                                                     token_factory: Callable[..., str]) -> None:
    engine = standin[0]
    aborted = engine.aborted
    with httpx.stream("POST", f"{gateway.url}/v1/completions", headers=_auth(token_factory), timeout=10,
                      json={"model": MODEL, "prompt": "slowly", "max_tokens": 100, "stream": True}) as response:
        assert response.status_code == 200
        for _ in response.iter_lines():
            # checked before leaving the loop: leaving it closes the connection, and the abort may already be done
            assert engine.running == 1
            break
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    assert engine.aborted == aborted + 1


def test_a_client_leaving_before_the_engine_answers_drops_the_engine_request(
        standin: tuple[StandInEngine, ServerThread], gateway: ServerThread,
        token_factory: Callable[..., str]) -> None:
    """The engine has the request but has sent nothing yet (queued, or a long prefill): the client leaving closes the
    gateway's connection to it, and the request is recorded as the client's 499."""
    engine = standin[0]
    aborted, closed_before = engine.aborted, _requests_with_status(gateway, "499")

    async def leave_early() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            call = asyncio.create_task(client.post(
                f"{gateway.url}/v1/completions", headers=_auth(token_factory),
                json={"model": MODEL, "prompt": "hold the headers", "max_tokens": 5, "stream": True}))
            deadline = time.monotonic() + 10
            while not engine.holding:
                assert not call.done(), f"answered before the engine held it: {call.result().status_code}"
                assert time.monotonic() < deadline, "the engine never got the request"
                await asyncio.sleep(0.02)
            call.cancel()  # closes the connection to the gateway
            with contextlib.suppress(asyncio.CancelledError):
                await call

    asyncio.run(leave_early())
    deadline = time.monotonic() + 10
    while (engine.holding or _requests_with_status(gateway, "499") == closed_before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.holding == 0 and engine.aborted == aborted + 1, "the engine's request outlived its client"
    assert _requests_with_status(gateway, "499") == closed_before + 1


def _requests_with_status(server: ServerThread, status: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "deepseek_api_requests_total" and sample.labels.get("status") == status
               and sample.labels.get("route") == "/v1/completions")


def test_engine_metrics_through_the_gateway(gateway: ServerThread) -> None:
    response = httpx.get(f"{gateway.url}/metrics/engine", timeout=10)
    assert response.status_code == 200
    assert "vllm:num_requests_running" in response.text


def test_queue_depth_is_the_engines_waiting_requests(standin: tuple[StandInEngine, ServerThread],
                                                     gateway: ServerThread) -> None:
    engine = standin[0]
    try:
        for waiting in (4, 0):
            engine.waiting = waiting
            text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
            assert f"deepseek_queue_depth {float(waiting)}" in text.splitlines()
    finally:
        engine.waiting = 0


def test_an_engine_that_stalls_in_its_metrics_is_an_engine_timeout(auth_dir: Path) -> None:
    """An engine that sends its metrics' headers and then nothing more: /metrics/engine answers 503 in OpenAI's
    shape, as when it sends nothing at all, and the gateway's own /metrics still answers, within 2 s,
    with the queue depth unknown (NaN: the last value would pass for the present), and a number again once the
    engine answers."""
    engine = StandInEngine()
    engine_server = serve(engine)
    settings = ServerSettings(engine="vllm", engine_url=engine_server.url, model_name=MODEL, auth_dir=auth_dir,
                              engine_connect_timeout_s=0.2)  # the engine's metrics time out after 5.2 s
    gateway = ServerThread(create_app(settings)).start(ready_timeout=30)
    try:
        engine.waiting = 3
        assert "deepseek_queue_depth 3.0" in httpx.get(f"{gateway.url}/metrics", timeout=10).text.splitlines()
        engine.metrics_stall_s = 30.0
        response = httpx.get(f"{gateway.url}/metrics/engine", timeout=20)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert "did not arrive within 5.2 s" in error["message"], error["message"]
        started = time.monotonic()
        own = httpx.get(f"{gateway.url}/metrics", timeout=20)
        assert own.status_code == 200, own.text
        assert time.monotonic() - started < 2.9  # the autoscaler gives a pod's /metrics 3 s
        assert "deepseek_queue_depth NaN" in own.text.splitlines()
        engine.metrics_stall_s = 0.0
        assert "deepseek_queue_depth 3.0" in httpx.get(f"{gateway.url}/metrics", timeout=10).text.splitlines()
    finally:
        engine.metrics_stall_s = 0.0
        gateway.stop()
        engine_server.stop()


def test_unreachable_engine_answers_503_quickly(auth_dir: Path, token_factory: Callable[..., str]) -> None:
    engine_url = f"http://127.0.0.1:{free_port()}"
    settings = ServerSettings(engine="vllm", engine_url=engine_url, model_name=MODEL, auth_dir=auth_dir)
    server = ServerThread(create_app(settings))
    server.thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{server.url}/ready", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert ready.status_code == 503
        assert "unreachable" in ready.json()["error"]
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/completions", headers=_auth(token_factory), timeout=30,
                              json={"model": MODEL, "prompt": "hi"})
        assert time.monotonic() - started < 5  # not the engine's 600 s read timeout
        assert response.status_code == 503
        assert response.headers["retry-after"]
        # an engine that cannot be reached is said so (before: "the model is not loaded yet"), without its address
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable" and "unreachable" in error["message"], error
        assert engine_url.split("//")[1] not in error["message"]
    finally:
        server.stop()


def test_a_busy_engine_that_answers_its_health_check_late_keeps_serving(auth_dir: Path,
                                                                         token_factory: Callable[..., str]) -> None:
    """One late health check is a busy engine, not a lost one: requests are still relayed. Only after
    PROBE_TIMEOUTS_BEFORE_NOT_READY late checks in a row does the gateway stop admitting (503, the reason says why),
    and it admits again once the engine answers in time."""
    from deepseek_server.engine.openai_upstream import PROBE_TIMEOUTS_BEFORE_NOT_READY

    engine = StandInEngine()
    engine_server = serve(engine)
    settings = ServerSettings(engine="vllm", engine_url=engine_server.url, model_name=MODEL, auth_dir=auth_dir,
                              engine_connect_timeout_s=0.2)  # health checks time out after 2.2 s
    gateway = ServerThread(create_app(settings)).start(ready_timeout=30)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    try:
        engine.health_delay_s = 3.0
        deadline = time.monotonic() + 2.2 * (PROBE_TIMEOUTS_BEFORE_NOT_READY - 1)  # before the last late check ends
        answered = 0
        while time.monotonic() < deadline:
            response = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), json=body, timeout=30)
            assert response.status_code == 200, response.text
            answered += 1
            time.sleep(0.2)
        assert answered >= 5
        ready = wait_for("the gateway to give the engine up", lambda: (
            lambda r: r if r.status_code == 503 else None)(httpx.get(f"{gateway.url}/ready", timeout=5)),
            timeout=30, interval=0.2)
        assert f"{PROBE_TIMEOUTS_BEFORE_NOT_READY} health check(s) in a row timed out" in ready.json()["error"]
        refused = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), json=body, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        engine.health_delay_s = 0.0
        wait_for("the gateway to admit again", lambda: httpx.get(f"{gateway.url}/ready", timeout=5).status_code
                 == 200, timeout=30, interval=0.2)
        again = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), json=body, timeout=30)
        assert again.status_code == 200
    finally:
        gateway.stop()
        engine_server.stop()


def test_a_connection_slow_to_open_is_not_a_lost_engine(auth_dir: Path, token_factory: Callable[..., str]) -> None:
    """A request whose connection to the engine is not made within the connect timeout gets 503, and the engine stays
    ready: on a loaded node a loopback connect can miss a 1 s timeout with the engine healthy, and taking it for a lost
    engine refused every other request until the next health check. Health checks that cannot connect in time count
    as late ones: PROBE_TIMEOUTS_BEFORE_NOT_READY of them in a row make the engine not ready."""
    from deepseek_server.engine.openai_upstream import PROBE_TIMEOUTS_BEFORE_NOT_READY

    engine = StandInEngine()
    engine_server = serve(engine)
    relay = StallingRelay(engine_server.url)
    settings = ServerSettings(engine="vllm", engine_url=relay.url, model_name=MODEL, auth_dir=auth_dir,
                              engine_connect_timeout_s=0.5)
    gateway = ServerThread(create_app(settings)).start(ready_timeout=30)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    try:
        assert httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), json=body,
                          timeout=30).status_code == 200
        relay.stall()
        response = httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), json=body, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert "connecting took over 0.5 s" in response.json()["error"]["message"]
        assert response.headers["retry-after"]
        ready = httpx.get(f"{gateway.url}/ready", timeout=5)
        assert ready.status_code == 200, ready.text  # was 503: the engine was taken for lost at once
        given_up = wait_for("the gateway to give the engine up", lambda: (
            lambda r: r if r.status_code == 503 else None)(httpx.get(f"{gateway.url}/ready", timeout=5)),
            timeout=30, interval=0.1)
        assert f"{PROBE_TIMEOUTS_BEFORE_NOT_READY} health check(s) in a row timed out" in given_up.json()["error"]
        assert "connecting took over 0.5 s" in given_up.json()["error"]
        relay.resume()
        wait_for("the gateway to admit again", lambda: httpx.get(f"{gateway.url}/ready", timeout=5).status_code
                 == 200, timeout=30, interval=0.2)
        assert httpx.post(f"{gateway.url}/v1/completions", headers=_auth(token_factory), json=body,
                          timeout=30).status_code == 200
    finally:
        gateway.stop()
        relay.close()
        engine_server.stop()


def test_an_error_the_engine_streams_is_in_openai_shape_recorded_and_not_charged_as_tokens(
        standin: tuple[StandInEngine, ServerThread], auth_dir: Path, tmp_path: Path,
        token_factory: Callable[..., str]) -> None:
    """vLLM refuses some requests only after its 200 (an out-of-vocabulary `logit_bias` or `allowed_token_ids`, a
    grammar it cannot compile, a streamed prompt of token ids it lacks), and can fail midway: it sends an error event,
    then `[DONE]`. The client gets the error in OpenAI's shape, as the same error unstreamed; the audit record has its
    code (the record said 200 with no error); and the error event and `[DONE]` are not counted as generated tokens
    (they were, two tokens for a request that generated none)."""
    audit = tmp_path / "audit.jsonl"
    settings = ServerSettings(engine="vllm", engine_url=standin[1].url, model_name=MODEL, auth_dir=auth_dir,
                              audit_log=audit)
    gateway = ServerThread(create_app(settings)).start(ready_timeout=30)
    headers = _auth(token_factory)
    try:
        def stream(prompt: str) -> tuple[list[Any], str]:
            response = httpx.post(f"{gateway.url}/v1/completions", headers=headers, timeout=30,
                                  json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True})
            assert response.status_code == 200
            return _events(response.text), response.headers["x-request-id"]

        generated_before, counted_before = _generated_tokens(gateway), _completions_by_status(gateway)
        refused, refused_id = stream("refuse late")
        assert refused == [{"error": {
            "message": "token_id(s) [99999999] in logit_bias contain out-of-vocab token ids. Vocabulary size: 384 "
                       "(parameter=logit_bias, value=[99999999])",
            "type": "invalid_request_error", "param": "logit_bias", "code": None}}, "[DONE]"]
        failed, failed_id = stream("fail midway")
        assert [event["choices"][0]["delta"]["content"] for event in failed[:3]] == ["w", "w", "w"]
        assert failed[3] == {"error": {"message": "The inference engine failed: EngineCore encountered an issue.",
                                       "type": "server_error", "param": None, "code": "engine_error"}}
        assert failed[4:] == ["[DONE]"]
        records = wait_for("both audit records", lambda: (lambda found: found if len(found) == 2 else None)(
            {r["request_id"]: r for r in (json.loads(line) for line in audit.read_text().splitlines())
             if r["request_id"] in (refused_id, failed_id)} if audit.exists() else {}), timeout=30)
        assert [(r["status"], r["error_code"], r["prompt_tokens"], r["completion_tokens"])
                for r in (records[refused_id], records[failed_id])] == [
            (200, "invalid_request_error", 0, 0), (200, "engine_error", 0, 3)]
        assert _generated_tokens(gateway) - generated_before == 3
        # counted under the status each error has unstreamed (the refusal's 400, the failure's 502), not as 200s:
        # the post-switch analysis and the error-rate alert count 5xx
        counted = _completions_by_status(gateway)
        assert {status: counted[status] - counted_before.get(status, 0) for status in counted
                if counted[status] != counted_before.get(status, 0)} == {"400": 1, "502": 1}
    finally:
        gateway.stop()


def test_a_stream_the_engine_drops_or_stalls_is_counted_as_the_server_error_it_is(
        standin: tuple[StandInEngine, ServerThread], auth_dir: Path, tmp_path: Path,
        token_factory: Callable[..., str]) -> None:
    """An engine that dies or stops sending midway: the stream ends with `engine_unavailable` or `engine_timeout`,
    and /metrics counts it under the 503 or 504 the same failure gets unstreamed, where the post-switch analysis and
    the error-rate alert look (it was counted as a 200); the audit record keeps the 200 that was sent."""
    audit = tmp_path / "audit.jsonl"
    settings = ServerSettings(engine="vllm", engine_url=standin[1].url, model_name=MODEL, auth_dir=auth_dir,
                              audit_log=audit, engine_read_timeout_s=0.5)
    gateway = ServerThread(create_app(settings)).start(ready_timeout=30)
    headers = _auth(token_factory)
    try:
        counted_before = _completions_by_status(gateway)
        codes, request_ids = [], []
        for prompt in ("stall midway", "drop midway"):  # the drop marks the engine lost: last
            response = httpx.post(f"{gateway.url}/v1/completions", headers=headers, timeout=30,
                                  json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True})
            assert response.status_code == 200
            events = _events(response.text)
            assert [event["choices"][0]["delta"]["content"] for event in events[:2]] == ["w", "w"], events
            assert events[-1] == "[DONE]"  # after the error event, as vLLM ends a stream
            codes.append(events[-2]["error"]["code"])
            request_ids.append(response.headers["x-request-id"])
        assert codes == ["engine_timeout", "engine_unavailable"]
        counted = _completions_by_status(gateway)
        assert {status: counted[status] - counted_before.get(status, 0) for status in counted
                if counted[status] != counted_before.get(status, 0)} == {"504": 1, "503": 1}
        records = wait_for("both audit records", lambda: (lambda found: found if len(found) == 2 else None)(
            {r["request_id"]: r for r in (json.loads(line) for line in audit.read_text().splitlines())
             if r["request_id"] in request_ids} if audit.exists() else {}), timeout=30)
        assert [(records[i]["status"], records[i]["error_code"]) for i in request_ids] == [
            (200, "engine_timeout"), (200, "engine_unavailable")]
    finally:
        gateway.stop()


def _completions_by_status(server: ServerThread) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)
    return {sample.labels["status"]: sample.value for family in families if family.name == "deepseek_api_requests"
            for sample in family.samples if sample.labels["route"] == "/v1/completions"}


def _generated_tokens(server: ServerThread) -> float:
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)
    return sum(sample.value for family in families if family.name == "deepseek_generated_tokens"
               for sample in family.samples if sample.name.endswith("_total"))


def test_gateway_imports_no_torch(tmp_path: Path) -> None:
    """`--engine vllm` must run from a lean install: building the app loads neither torch nor transformers."""
    (tmp_path / "auth").mkdir()
    script = (
        "import sys\n"
        "from deepseek_server.__main__ import main\n"
        "from deepseek_server.app import create_app\n"
        "from deepseek_server.settings import ServerSettings\n"
        f"create_app(ServerSettings(engine='vllm', model_name='m', auth_dir={str(tmp_path / 'auth')!r}))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_builtin_engine_refuses_what_it_cannot_honour(auth_dir: Path, token_factory: Callable[..., str]) -> None:
    """Capabilities are data per engine: the in-process engine takes no logprobs, echo or vLLM extensions."""
    from deepseek_server.engine.noop import NoopEngine

    settings = ServerSettings(model_name="noop", auth_dir=auth_dir)
    server = ServerThread(create_app(settings, engine=NoopEngine())).start(ready_timeout=30)
    try:
        url, headers = f"{server.url}/v1/completions", _auth(token_factory)
        for param, value in (("top_k", 5), ("echo", True), ("logprobs", 0), ("suffix", "")):
            refused = httpx.post(url, headers=headers, timeout=10,
                                 json={"model": "noop", "prompt": "a b", param: value})
            assert refused.status_code == 400, param
            assert refused.json()["error"]["param"] == param
            assert refused.json()["error"]["code"] == "unsupported_parameter"
        neutral = {"model": "noop", "prompt": "a b", "echo": False, "logprobs": None, "user": "u", "max_tokens": 2}
        assert httpx.post(url, headers=headers, timeout=10, json=neutral).status_code == 200
        assert httpx.get(f"{server.url}/metrics/engine", timeout=10).status_code == 404
    finally:
        server.stop()


def test_usage_chunk_is_removed_and_its_fingerprint_moves_to_the_last_chunks() -> None:
    from deepseek_server.relay import _take_usage, _with_fingerprint

    events = (b'data: {"choices":[{"index":0,"text":"a","finish_reason":"length"}]}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1},"system_fingerprint":"fp"}\n\n'
              b"data: [DONE]\n\n")
    kept, usage = _take_usage(events, client_usage=False)
    assert usage == {"prompt_tokens": 2, "completion_tokens": 1}
    assert kept == b'data: {"choices":[{"index":0,"text":"a","finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
    assert _with_fingerprint(kept, b'"fp"') == (b'data: {"choices":[{"index":0,"text":"a","finish_reason":"length"}]'
                                                b',"system_fingerprint":"fp"}\n\ndata: [DONE]\n\n')
    assert _take_usage(events, client_usage=True) == (events, usage)


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "prompt": "hi", "stream": true}',
    b'{"model":"m","prompt":"hi","stream":true}\n',
    b'  {"model": "m", "prompt": "}", "stream": true} \r\n',
    b'{"model": "m", "prompt": "hi", "stream": true, "stream_options": {"include_usage": false}}',
    b'{"model": "m", "prompt": "hi", "stream": true, "stream_options": null}',
    b'{"model": "m", "prompt": "hi", "stream": true, "stream_options": {"include_usage": true, "x": 1}}',
    '{"model": "m", "prompt": "h\u00e9", "stream": true}'.encode("utf-16"),
])
def test_the_engine_is_always_asked_for_usage(raw: bytes) -> None:
    """The relayed request is the client's, with `stream_options.include_usage` true (other stream options kept)."""
    sent = json.loads(raw)
    body = CompletionRequest.model_validate(sent)
    relayed = json.loads(_asking_for_usage(raw, body))
    assert relayed == {**sent, "stream_options": {**(sent.get("stream_options") or {}), "include_usage": True}}


def test_a_prompt_over_the_context_is_context_length_exceeded() -> None:
    """vLLM's 400 for a prompt longer than the context carries no code; OpenAI's (and the builtin engine's) is
    `context_length_exceeded`, which clients check to shorten the conversation. Its message and param stay vLLM's."""
    from deepseek_server.engine.openai_upstream import engine_error

    message = ("This model's maximum context length is 1024 tokens. However, your prompt contains at least 1025 input "
               "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the "
               "input prompt. (parameter=input_tokens, value=1025)")
    error = engine_error(400, json.dumps({"error": {"message": message, "type": "BadRequestError",
                                                    "param": "input_tokens", "code": 400}}).encode())
    assert (error.status, error.code, error.param, error.message) == (400, "context_length_exceeded",
                                                                           "input_tokens", message)
    other = engine_error(400, json.dumps({"error": {"message": "top_k must be 0 (disable), or at least 1, got -5.",
                                                    "type": "BadRequestError", "param": None, "code": 400}}).encode())
    assert other.code is None
