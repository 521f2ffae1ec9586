"""A small HTTP/1.1 client for the one engine on localhost: pooled keep-alive connections on asyncio streams.

The gateway relays every token of every stream through this client, so its per-chunk cost is the gateway's cost.
General-purpose clients parse each chunk through several layers (a protocol state machine, a cancel scope per
read); this one reads a chunk's size line and its bytes straight from the stream, which makes a relayed token cost
a few microseconds. It speaks only what an OpenAI-compatible engine server answers: a status line, headers, and a
body with a Content-Length, chunked, or up to the end of the connection.

Deadlines cost nothing per chunk: a response notes when it last received bytes, and one timer per response checks
that from time to time and drops the connection when the engine has been silent for longer than the read timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any


class EngineConnectionError(ConnectionError):
    """The engine could not be reached, or dropped the connection before answering in full."""


class EngineConnectTimeout(EngineConnectionError):
    """Connecting took longer than the connect timeout. On localhost that is an engine (or a gateway) too busy to
    complete the handshake in time as often as a gone one, so it is not taken for a lost engine by itself."""


class EngineTimeout(TimeoutError):
    """The engine accepted the request but sent nothing for longer than the read timeout."""


_MAX_HEAD = 64 * 1024


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def close(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


class EngineResponse:
    """One response; its status and headers are read, its body is read on demand.

    `aclose()` before the body is fully read drops the connection: that is how the engine learns that the
    client left, and it aborts the request.
    """

    def __init__(self, pool: EngineHTTPClient, conn: _Connection, status: int, headers: dict[str, str],
                 read_timeout: float) -> None:
        self._pool, self._conn = pool, conn
        self.status_code = status
        self.headers = headers
        self.content = b""
        self._read_timeout = read_timeout
        self._complete = False
        self._closed = False
        self._timed_out = False
        self._last_read = time.monotonic()
        length = headers.get("content-length")
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._length = int(length) if length is not None and not self._chunked else None
        if status in (204, 304):  # no body, whatever the headers say
            self._chunked, self._length = False, 0
        self._keep_alive = headers.get("connection", "").lower() != "close" and (
            self._chunked or self._length is not None)
        self._watchdog = asyncio.get_running_loop().call_later(read_timeout, self._check_silence)

    def _check_silence(self) -> None:
        silent_for = time.monotonic() - self._last_read
        if silent_for >= self._read_timeout:
            self._timed_out = True
            self._conn.close()
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self._read_timeout - silent_for,
                                                                   self._check_silence)

    def _failure(self, exc: BaseException) -> Exception:
        if self._timed_out:
            return EngineTimeout(f"the engine sent nothing for {self._read_timeout:g} s")
        return EngineConnectionError(f"the engine closed the connection mid-answer ({type(exc).__name__})")

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing removed), one piece per chunk as the engine framed it."""
        return self._body(joined=False)

    def aiter_arrived(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, each piece everything that one network read completed: whole chunks,
        framing removed, several of them joined when they came together.

        A relay sends each piece on in one write. When the gateway falls behind (many streams, a busy CPU), the
        chunks that queued meanwhile go out together, so its cost per token falls as the load rises instead of
        being paid once per chunk; when it keeps up, each chunk still goes out the moment it arrives."""
        return self._body(joined=True)

    async def _body(self, *, joined: bool) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        try:
            if self._chunked:
                # Whatever has arrived is read at once and split here: one wait per network read, where a size line
                # and then its data through the stream reader cost two coroutine calls per chunk (per relayed token).
                buffer = b""
                last = False
                while not last:
                    data = await reader.read(65536)
                    if not data:
                        raise asyncio.IncompleteReadError(buffer, None)
                    self._last_read = time.monotonic()
                    buffer = buffer + data if buffer else data
                    start = 0
                    complete: list[bytes] = []
                    while (line_end := buffer.find(b"\r\n", start)) >= 0:
                        size = int(buffer[start:line_end].split(b";", 1)[0], 16)
                        data_end = line_end + 2 + size
                        if len(buffer) < data_end + 2:  # the rest of this chunk is still on its way
                            break
                        if buffer[data_end:data_end + 2] != b"\r\n":
                            raise ValueError("a chunk does not end where its size says")
                        start = data_end + 2
                        if size == 0:  # the last chunk; an engine sends no trailers, so the empty line follows
                            last = True
                            if start < len(buffer):  # bytes beyond the answer: the connection cannot be reused
                                self._keep_alive = False
                            break
                        if joined:
                            complete.append(buffer[line_end + 2:data_end])
                        else:
                            yield buffer[line_end + 2:data_end]
                    if complete:
                        yield complete[0] if len(complete) == 1 else b"".join(complete)
                    buffer = buffer[start:]
                    if len(buffer) > _MAX_HEAD and b"\r\n" not in buffer:
                        raise ValueError("a chunk size line is too long")
            elif self._length is not None:
                left = self._length
                while left:
                    data = await reader.read(min(left, 65536))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    self._last_read = time.monotonic()
                    left -= len(data)
                    yield data
            else:
                while data := await reader.read(65536):
                    self._last_read = time.monotonic()
                    yield data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self._keep_alive = False
            raise self._failure(exc) from exc
        self._complete = True

    async def aread(self) -> bytes:
        self.content = b"".join([piece async for piece in self.aiter_raw()])
        await self.aclose()
        return self.content

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    async def aclose(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """`aclose` without awaiting: it never waits."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.cancel()
        if self._complete and self._keep_alive:
            self._pool._release(self._conn)
        else:
            self._conn.close()


class EngineHTTPClient:
    """Keep-alive connections to one engine at `host:port`, opened on demand and reused while fresh."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, read_timeout: float,
                 keepalive_expiry: float, max_idle: int = 512) -> None:
        self.host, self.port = host, port
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.keepalive_expiry, self.max_idle = keepalive_expiry, max_idle
        self._idle: deque[_Connection] = deque()
        self._host_header = f"{host}:{port}".encode()

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=_MAX_HEAD)
        except TimeoutError as exc:
            raise EngineConnectTimeout(f"connecting took over {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise EngineConnectionError(f"cannot connect ({exc.strerror or type(exc).__name__})") from exc
        return _Connection(reader, writer)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used one: the least likely to be closed by the engine
            if now - conn.idle_since < self.keepalive_expiry and not conn.reader.at_eof() \
                    and not conn.writer.transport.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        if len(self._idle) >= self.max_idle or conn.reader.at_eof():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def request(self, method: str, path: str, body: bytes = b"", *, timeout: float | None = None,
                      headers: bytes = b"") -> EngineResponse:
        """Send one request and return once the status line and headers are in; `headers`: more header lines, each
        ending with CRLF."""
        head = (b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"accept: */*\r\n%s\r\n" % (method.encode(), path.encode(), self._host_header, len(body), headers))
        conn = self._take_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect()
            try:
                return await self._exchange(conn, head + body, timeout or self.read_timeout)
            except _StaleConnection:
                # A kept-alive connection the engine closed while it sat idle: it never saw this request.
                conn.close()
                if not reused:
                    raise EngineConnectionError("the engine closed the connection without answering") from None
                conn, reused = None, False
            except BaseException:
                conn.close()
                raise

    async def _exchange(self, conn: _Connection, payload: bytes, timeout: float) -> EngineResponse:
        conn.writer.write(payload)
        try:
            async with asyncio.timeout(timeout):
                head = await conn.reader.readuntil(b"\r\n\r\n")
        except TimeoutError as exc:
            raise EngineTimeout(f"the engine did not answer within {timeout:g} s") from exc
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _StaleConnection from exc
            raise EngineConnectionError("the engine closed the connection mid-answer") from exc
        except ConnectionResetError as exc:
            raise _StaleConnection from exc
        except (OSError, asyncio.LimitOverrunError) as exc:
            raise EngineConnectionError(f"reading the answer failed ({type(exc).__name__})") from exc
        lines = head[:-4].decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise EngineConnectionError(f"the engine answered a malformed status line {lines[0][:80]!r}") from exc
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return EngineResponse(self, conn, status, headers, self.read_timeout)

    def close(self) -> None:
        """Close the idle connections; responses still open close theirs when their owners do."""
        while self._idle:
            self._idle.pop().close()


class _StaleConnection(Exception):
    pass
