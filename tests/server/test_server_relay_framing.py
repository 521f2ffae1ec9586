"""The engine client's chunked-body parser against an engine that splits its answer at every possible byte: each
chunk still arrives as one piece, as the engine framed it, and the connection is reused only after a clean end."""

from __future__ import annotations

import asyncio

import pytest
from deepseek_server.engine.engine_http import EngineConnectionError, EngineHTTPClient

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
