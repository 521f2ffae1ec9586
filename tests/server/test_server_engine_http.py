"""The gateway's HTTP/1.1 client for its engine, against a raw asyncio server that counts connections and requests:
framing, keep-alive reuse, a kept-alive connection the engine closed, silence past the read timeout, and a response
closed early (how the engine learns that a client left)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from deepseek_server.engine.engine_http import EngineConnectionError, EngineHTTPClient, EngineTimeout
from deepseek_server.engine.openai_upstream import OpenAIUpstreamEngine, waiting_requests

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class RawEngine:
    """Reads requests (head + Content-Length body) and lets a handler answer; returns False to close."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head.split(b"\r\n", 1)[0] + b" " + body)
                if not await self.handler(body, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def engine_factory() -> AsyncIterator[Callable[[Handler], Awaitable[RawEngine]]]:
    started: list[RawEngine] = []

    async def start(handler: Handler) -> RawEngine:
        engine = RawEngine(handler)
        engine.server = await asyncio.start_server(engine.serve, "127.0.0.1", 0)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        assert engine.server is not None
        engine.server.close()


def client(engine: RawEngine, read_timeout: float = 30.0) -> EngineHTTPClient:
    return EngineHTTPClient("127.0.0.1", engine.port, connect_timeout=2.0, read_timeout=read_timeout,
                            keepalive_expiry=4.0)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def answer_chunked(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for part in (b"data: one\n\n", b"data: two\n\n", b"x" * 70000):
        writer.write(chunk(part))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


async def answer_sized(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()
    return True


async def test_chunked_and_sized_bodies_arrive_whole_over_one_kept_alive_connection(engine_factory) -> None:
    engine = await engine_factory(answer_chunked)
    http = client(engine)
    for _ in range(3):
        response = await http.request("POST", "/v1/completions", b'{"stream":true}')
        pieces = [piece async for piece in response.aiter_raw()]
        await response.aclose()
        assert response.status_code == 200
        assert b"".join(pieces) == b"data: one\n\ndata: two\n\n" + b"x" * 70000
        assert pieces[0] == b"data: one\n\n"  # relayed as the engine framed it, not after the whole body
    assert engine.connections == 1 and len(engine.requests) == 3
    sized = await engine_factory(answer_sized)
    response = await client(sized).request("POST", "/echo", b'{"a":1}')
    assert (await response.aread(), response.status_code, response.headers["content-type"]) == (
        b'{"a":1}', 201, "application/json")
    assert response.json() == {"a": 1}
    http.close()


async def test_an_answer_without_a_body_ends_at_its_headers(engine_factory) -> None:
    async def no_content(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        return True

    engine = await engine_factory(no_content)
    http = client(engine, read_timeout=30)
    for _ in range(2):  # and the connection is reused for the next request
        response = await http.request("GET", "/health")
        assert (response.status_code, await asyncio.wait_for(response.aread(), 5)) == (204, b"")
    assert engine.connections == 1


async def test_a_kept_alive_connection_the_engine_closed_is_not_reused(engine_factory) -> None:
    async def answer_then_close(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await answer_sized(body, reader, writer)
        return False  # the engine ends the connection after each answer (as on its idle keep-alive timeout)

    engine = await engine_factory(answer_then_close)
    http = client(engine)
    for i in range(3):
        response = await http.request("POST", "/v1/completions", b'{"n":%d}' % i)
        assert await response.aread() == b'{"n":%d}' % i
        await asyncio.sleep(0.05)  # the close reaches the pooled connection
    assert len(engine.requests) == 3 and engine.connections == 3


async def test_a_reused_connection_dropped_without_an_answer_is_retried_once_on_a_fresh_one(
        engine_factory) -> None:
    served: dict[int, int] = {}

    async def drop_the_second_request(body: bytes, reader: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> bool:
        key = id(writer)
        served[key] = served.get(key, 0) + 1
        if served[key] == 2:  # as when the engine's idle timeout closes the connection as the request arrives
            return False
        return await answer_sized(body, reader, writer)

    engine = await engine_factory(drop_the_second_request)
    http = client(engine)
    assert await (await http.request("POST", "/a", b'"first"')).aread() == b'"first"'
    assert await (await http.request("POST", "/a", b'"second"')).aread() == b'"second"'
    assert engine.connections == 2 and [r.split(b" ")[-1] for r in engine.requests] == [
        b'"first"', b'"second"', b'"second"']


async def test_an_engine_that_drops_a_fresh_connection_is_an_error_not_a_retry_loop(engine_factory) -> None:
    async def drop(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False

    engine = await engine_factory(drop)
    with pytest.raises(EngineConnectionError, match="closed the connection"):
        await client(engine).request("POST", "/v1/completions", b"{}")
    assert len(engine.requests) == 1


async def test_nothing_listening_is_a_connection_error(engine_factory) -> None:
    engine = await engine_factory(answer_sized)
    port = engine.port
    assert engine.server is not None
    engine.server.close()
    await engine.server.wait_closed()
    http = EngineHTTPClient("127.0.0.1", port, connect_timeout=2.0, read_timeout=5.0, keepalive_expiry=4.0)
    with pytest.raises(EngineConnectionError, match="cannot connect"):
        await http.request("GET", "/health")


async def test_an_engine_silent_past_the_read_timeout_times_out(engine_factory) -> None:
    async def stall_mid_stream(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: one\n\n"))
        await writer.drain()
        await asyncio.sleep(30)
        return False

    engine = await engine_factory(stall_mid_stream)
    response = await client(engine, read_timeout=0.5).request("POST", "/v1/completions", b"{}")
    started = time.monotonic()
    received = []
    with pytest.raises(EngineTimeout, match=r"sent nothing for 0\.5 s"):
        async for piece in response.aiter_raw():
            received.append(piece)
    assert received == [b"data: one\n\n"]
    assert 0.4 <= time.monotonic() - started < 10


async def test_closing_a_response_early_drops_the_connection(engine_factory) -> None:
    async def endless(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(chunk(b"data: token\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)

    engine = await engine_factory(endless)
    http = client(engine)
    response = await http.request("POST", "/v1/completions", b"{}")
    async for _ in response.aiter_raw():
        break
    await response.aclose()
    await asyncio.wait_for(engine.closed_by_client.wait(), 10)  # the engine sees the client leave
    assert engine.connections == 1


async def test_stopping_the_gateway_as_a_request_finds_the_engine_gone_ends_its_readiness_monitor(
        engine_factory) -> None:
    """The readiness monitor sleeps between checks until a request reports the engine lost; a stop that comes
    together with such a report must end the monitor, not be taken for the report (the gateway would hang on
    shutdown)."""
    engine = await engine_factory(answer_sized)
    port = engine.port
    assert engine.server is not None
    engine.server.close()
    await engine.server.wait_closed()
    upstream = OpenAIUpstreamEngine(f"http://127.0.0.1:{port}", "tiny", max_new_tokens=8, probe_interval_s=30)
    first = upstream.not_ready_reason
    await upstream.start()
    monitor = upstream._monitor
    assert monitor is not None
    try:
        async with asyncio.timeout(5):
            while upstream.not_ready_reason == first:  # the first check failed: the monitor sleeps until the next
                await asyncio.sleep(0.01)
        upstream.lost("a request could not connect")
        stopping = asyncio.create_task(upstream.stop())
        # asyncio.wait, unlike a timeout around `await stopping`, does not cancel the monitor a second time
        finished, _ = await asyncio.wait({stopping}, timeout=5)
    finally:
        stuck = not monitor.done()
        monitor.cancel()
    assert not stuck and monitor.cancelled() and finished == {stopping}, "the readiness monitor outlived the stop"
    assert upstream.not_ready_reason == "the gateway is stopping"


def test_waiting_requests_sums_vllm_queue_samples() -> None:
    exposition = (b"# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                  b"# TYPE vllm:num_requests_waiting gauge\n"
                  b'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
                  b'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\n'
                  b'vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0\n'
                  b'vllm:num_requests_running{engine="0",model_name="m"} 7.0\n')
    assert waiting_requests(exposition) == 5
    assert waiting_requests(b"vllm:num_requests_waiting 4\n") == 4
    assert waiting_requests(b"") == 0
