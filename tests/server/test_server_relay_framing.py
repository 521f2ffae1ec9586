"""The engine client's chunked-body parser against an engine that splits its answer at every possible byte: each
chunk still arrives as one piece, as the engine framed it, and the connection is reused only after a clean end.
Chunks that arrive together are relayed to the client together, in one write."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deepseek_server.app import create_app
from deepseek_server.engine.engine_http import EngineConnectionError, EngineHTTPClient
from deepseek_server.settings import ServerSettings

from devcluster.testing.model_server import ServerThread

PARTS = (b"data: one\n\n", b"data: \xe4\xbd\xa0\n\n", b"x" * 70000, b'data: {"usage":1}\n\n')


def chunked(parts: tuple[bytes, ...]) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) if i == 1 else b"%x\r\n%s\r\n" % (len(p), p)
                    for i, p in enumerate(parts)) + b"0\r\n\r\n"


async def serve(answer: bytes, piece: int, connections: list[int]) -> asyncio.Server:
    """Answer every request with `answer` written `piece` bytes at a time, each write reaching the client alone."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                data = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + answer
                for start in range(0, len(data), piece):
                    writer.write(data[start:start + piece])
                    await writer.drain()
                    if piece < 64:
                        await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 4096, 1 << 20])
async def test_chunks_split_anywhere_arrive_whole_and_the_connection_is_reused(piece: int) -> None:
    connections: list[int] = []
    server = await serve(chunked(PARTS), piece, connections)
    port = server.sockets[0].getsockname()[1]
    http = EngineHTTPClient("127.0.0.1", port, connect_timeout=2, read_timeout=30, keepalive_expiry=10)
    try:
        for _ in range(2):
            response = await http.request("POST", "/v1/completions", b"{}")
            pieces = [p async for p in response.aiter_raw()]
            await response.aclose()
            assert tuple(pieces) == PARTS
        assert len(connections) == 1
    finally:
        http.close()
        server.close()


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 4096, 1 << 20])
async def test_arrived_pieces_are_whole_chunks_joined_as_they_came(piece: int) -> None:
    connections: list[int] = []
    server = await serve(chunked(PARTS), piece, connections)
    port = server.sockets[0].getsockname()[1]
    http = EngineHTTPClient("127.0.0.1", port, connect_timeout=2, read_timeout=30, keepalive_expiry=10)
    try:
        response = await http.request("POST", "/v1/completions", b"{}")
        pieces = [p async for p in response.aiter_arrived()]
        await response.aclose()
        assert b"".join(pieces) == b"".join(PARTS)
        ends = {sum(len(p) for p in PARTS[:i + 1]) for i in range(len(PARTS))}
        assert {sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))} <= ends  # never a chunk cut
        if piece == 1 << 20:  # all but the last part came at once, and the long one needs a second read
            assert len(pieces) < len(PARTS)
        response = await http.request("POST", "/v1/completions", b"{}")  # the connection was left clean
        assert b"".join([p async for p in response.aiter_arrived()]) == b"".join(PARTS)
        await response.aclose()
        assert len(connections) == 1
    finally:
        http.close()
        server.close()


async def test_a_chunk_longer_than_its_size_fails_and_drops_the_connection() -> None:
    connections: list[int] = []
    server = await serve(b"3\r\nabcdef\r\n0\r\n\r\n", 1 << 20, connections)
    port = server.sockets[0].getsockname()[1]
    http = EngineHTTPClient("127.0.0.1", port, connect_timeout=2, read_timeout=30, keepalive_expiry=10)
    try:
        response = await http.request("POST", "/v1/completions", b"{}")
        with pytest.raises(EngineConnectionError):
            async for _ in response.aiter_raw():
                pass
        await response.aclose()
        response = await http.request("POST", "/v1/completions", b"{}")  # a fresh connection, not the broken one
        with pytest.raises(EngineConnectionError):
            async for _ in response.aiter_raw():
                pass
        await response.aclose()
        assert len(connections) == 2
    finally:
        http.close()
        server.close()


# ------------------------------------------------------------------------------------------------ through the gateway
MODEL = "burst-engine"
TOKENS = 8


def _event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def _token_events(usage_null: bool) -> list[bytes]:
    return [_event({"id": "c", "object": "text_completion", "created": 1, "model": MODEL,
                    "choices": [{"index": 0, "text": " w", "finish_reason": "length" if i == TOKENS - 1 else None}],
                    **({"usage": None} if usage_null else {})}) for i in range(TOKENS)]


async def _burst_engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An engine that sends a whole streamed answer in one write, as a busy engine's backlog reaches the gateway."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == b"/v1/models":
                answer = json.dumps({"data": [{"id": MODEL, "max_model_len": 128}]}).encode()
            elif not body.get("stream"):
                answer = json.dumps({"choices": [{"index": 0, "text": " w", "finish_reason": "length"}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
            else:
                usage = _event({"id": "c", "object": "text_completion", "created": 1, "model": MODEL, "choices": [],
                                "usage": {"prompt_tokens": 1, "completion_tokens": TOKENS,
                                          "total_tokens": TOKENS + 1}})
                events = [*_token_events(usage_null=True), usage, b"data: [DONE]\n\n"]
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                             + chunked(tuple(events)))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
def burst_engine_url() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(_burst_engine, "127.0.0.1", 0, reuse_address=True))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _dechunk(body: bytes) -> list[bytes]:
    chunks = []
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        body = rest[size + 2:]


async def test_events_that_arrive_together_reach_the_client_in_one_write(
        burst_engine_url: str, auth_dir: Path, token_factory: Callable[..., str]) -> None:
    settings = ServerSettings(engine="vllm", engine_url=burst_engine_url, model_name=MODEL, auth_dir=auth_dir,
                              max_new_tokens=100)
    gateway = await asyncio.to_thread(ServerThread(create_app(settings)).start, 60)
    try:
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": TOKENS, "stream": True}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n"
                     b"authorization: Bearer %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (token_factory().encode(), len(body), body))
        answer = await asyncio.wait_for(reader.read(-1), 30)
        writer.close()
        head, _, framed = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        # the usage the gateway asked for is gone, and all the rest came in the one HTTP chunk it was sent in
        assert _dechunk(framed) == [b"".join([*_token_events(usage_null=False), b"data: [DONE]\n\n"])]
    finally:
        await asyncio.to_thread(gateway.stop)


async def test_the_clients_response_ends_at_done_without_waiting_for_the_engines_end(
        auth_dir: Path, token_factory: Callable[..., str]) -> None:
    """An engine sends the end of its chunked body after `[DONE]`, in a write of its own (vLLM does), here seconds
    later. The stream is complete at `[DONE]`: the client's response ends there, the tokens are accounted, and the
    engine's end is still read, so its connection is reused."""
    hold = 3.0
    connections: list[int] = []
    streamed_on: list[int] = []  # the connection each streamed request came on

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        connection = len(connections)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = json.loads(await reader.readexactly(length)) if length else {}
                if not body.get("stream"):  # /health, /v1/models, the readiness check's completion
                    answer = json.dumps({"data": [{"id": MODEL, "max_model_len": 128}]} if b"/v1/models" in head else
                                        {"choices": [{"index": 0, "text": " w", "finish_reason": "length"}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
                    continue
                streamed_on.append(connection)
                usage = _event({"id": "c", "object": "text_completion", "created": 1, "model": MODEL,
                                "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": TOKENS,
                                                         "total_tokens": TOKENS + 1}})
                events = [*_token_events(usage_null=True), usage, b"data: [DONE]\n\n"]
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
                             b"\r\n\r\n" + chunked(tuple(events)).removesuffix(b"0\r\n\r\n"))
                await writer.drain()
                await asyncio.sleep(hold)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(engine, "127.0.0.1", 0)  # served by this test's event loop
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    settings = ServerSettings(engine="vllm", engine_url=url, model_name=MODEL, auth_dir=auth_dir, max_new_tokens=100)
    gateway = await asyncio.to_thread(ServerThread(create_app(settings)).start, 60)
    try:
        token = token_factory(sub="slow-end")
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(2):
                started = time.monotonic()
                response = await client.post(f"{gateway.url}/v1/completions",
                                             headers={"authorization": f"Bearer {token}"},
                                             json={"model": MODEL, "prompt": "hi", "max_tokens": TOKENS,
                                                   "stream": True, "stream_options": {"include_usage": True}})
                took = time.monotonic() - started
                assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
                assert '"completion_tokens":8' in response.text
                assert took < hold / 2, f"the response ended {took:.2f} s after the request, with the engine's end"
                await asyncio.sleep(hold + 0.5)  # the engine's end has come: the connection is back in the pool
            metrics = (await client.get(f"{gateway.url}/metrics")).text
        generated = [line for line in metrics.splitlines() if line.startswith("deepseek_generated_tokens_total")]
        assert generated and float(generated[0].split()[-1]) == 2 * TOKENS  # both streams accounted
        assert streamed_on[0] == streamed_on[1]  # the second stream reused the first one's connection
    finally:
        await asyncio.to_thread(gateway.stop)
        server.close()


async def test_the_last_events_and_the_end_of_the_response_go_out_in_one_message(
        burst_engine_url: str, auth_dir: Path, token_factory: Callable[..., str], tmp_path: Path) -> None:
    """The events ending in `[DONE]` end the response in the same ASGI message (one write to the client, instead of
    a second one for the end of the body after the stream's accounting), and that stream is already accounted in the
    audit record and the metrics."""
    audit_log = tmp_path / "audit.jsonl"
    settings = ServerSettings(engine="vllm", engine_url=burst_engine_url, model_name=MODEL, auth_dir=auth_dir,
                              max_new_tokens=100, audit_log=audit_log)
    app = create_app(settings)
    sent: list[dict[str, Any]] = []

    async def recorded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def record(message: dict[str, Any]) -> None:
            if scope["type"] == "http" and scope["path"] == "/v1/completions":
                sent.append(message)
            await send(message)

        await app(scope, receive, record)

    gateway = await asyncio.to_thread(ServerThread(recorded).start, 60)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(f"{gateway.url}/v1/completions",
                                         headers={"authorization": f"Bearer {token_factory(sub='one-write')}"},
                                         json={"model": MODEL, "prompt": "hi", "max_tokens": TOKENS, "stream": True})
            assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
            metrics = (await client.get(f"{gateway.url}/metrics")).text
    finally:
        await asyncio.to_thread(gateway.stop)
    bodies = [message for message in sent if message["type"] == "http.response.body"]
    assert [message.get("more_body", False) for message in bodies] == [False], bodies
    assert bodies[0]["body"].endswith(b"data: [DONE]\n\n")
    generated = [line for line in metrics.splitlines() if line.startswith("deepseek_generated_tokens_total")]
    assert generated and float(generated[0].split()[-1]) == TOKENS
    records = [json.loads(line) for line in audit_log.read_text().splitlines()]
    streamed = [record for record in records if record.get("path") == "/v1/completions"]
    assert len(streamed) == 1 and streamed[0]["completion_tokens"] == TOKENS, records
