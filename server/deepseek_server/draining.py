"""A graceful stop that does not race clients' keep-alive connections.

On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish, and closes every idle keep-alive
connection at once. A client that sends its next request on such a connection at that moment (a busy client sends
one every few milliseconds) has it cut off: the close reaches it only after it has written the request. Behind a
Service the pod has already left the endpoints (the preStop wait), so the client would have been served elsewhere had
it opened a new connection.

`DrainingServer` instead keeps open connections: a request that arrives on one is still answered, with
`Connection: close` (`ConnectionCloseWhenDraining`), and so is a request being answered when the stop begins whose
response has not started (uvicorn's own keep-alive flag for it is turned off), so the client closes the connection and
connects again (to another pod); a connection is closed by the server only once it has been idle for `idle_close_s`
(`--drain-idle-s`, 2 s). Then
uvicorn's own shutdown runs (in-flight requests and streams finish within the rest of the shutdown grace, the
lifespan ends).

Requests still running shortly before the grace ends are cut by `on_grace_over` (the engine stops their rows, so a
stream ends with `finish_reason: length` and `data: [DONE]`, a non-streamed request is answered with what it has),
with `CUT_FLUSH_S` left to write those last events (half the grace, when it is shorter than twice that). What still
runs when the grace ends is cancelled by uvicorn's own shutdown, which gets only what is left of the grace: the
client then gets a stream cut mid-body, or a bare 500, and no request runs past the grace (the pod's
terminationGracePeriodSeconds is the preStop wait plus the grace, and the kubelet kills what outlives it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

POLL_S = 0.05
# before the grace ends, requests still running are cut this long ahead (at most half the grace), to write their ends
CUT_FLUSH_S = 1.0


class Draining:
    """Whether the process is stopping (set by `DrainingServer`, read by `ConnectionCloseWhenDraining`)."""

    def __init__(self) -> None:
        self.active = False


class ConnectionCloseWhenDraining:
    """Pure ASGI middleware: while draining, every response of a request that began then carries `Connection: close`
    (those begun earlier get it from `DrainingServer`). Until then a request passes with its own `send`: a wrapper
    around every request's `send` was about 1 % of a short request's CPU."""

    def __init__(self, app: Any, draining: Draining) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self.draining.active or scope["type"] != "http":  # serving: `send` as it is, no wrapper per request
            await self.app(scope, receive, send)
            return

        async def closing_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and self.draining.active:
                message.setdefault("headers", []).append((b"connection", b"close"))
            await send(message)

        await self.app(scope, receive, closing_send)


def _busy(connection: Any) -> bool:
    """Whether a connection (uvicorn's protocol object) is answering a request."""
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and not cycle.response_complete


def _close_after_answer(connection: Any) -> None:
    """The request a connection is answering, if its response has not started: uvicorn sends it with
    `Connection: close` and closes the connection after it (its keep-alive flag for the request, off). A response
    already under way keeps its headers (a close the client was not told of could cut its next request); its
    connection is closed once idle."""
    cycle = getattr(connection, "cycle", None)
    if (cycle is not None and not getattr(cycle, "response_started", True)
            and getattr(cycle, "keep_alive", False)):
        cycle.keep_alive = False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, draining: Draining, idle_close_s: float = 2.0,
                 on_grace_over: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(config)
        self.draining = draining
        self.idle_close_s = idle_close_s  # a connection open at the stop is closed once it had no request this long
        self.on_grace_over = on_grace_over  # ends the requests still running when the grace is nearly over

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.draining.active = True  # requests from now on are answered with Connection: close
        for server in self.servers:  # no new connections
            server.close()
        for sock in sockets or []:
            sock.close()
        grace = self.config.timeout_graceful_shutdown
        started = time.monotonic()
        deadline = started + grace if grace is not None else None
        cut_at = None if deadline is None or self.on_grace_over is None else deadline - min(CUT_FLUSH_S, grace / 2)
        idle_since: dict[Any, float] = {}
        while (self.server_state.connections and not self.force_exit
               and (deadline is None or time.monotonic() < deadline)):
            now = time.monotonic()
            if cut_at is not None and now >= cut_at:
                cut_at = None
                if any(_busy(connection) for connection in self.server_state.connections):
                    log.warning("shutdown grace nearly over: ending the requests still running")
                    assert self.on_grace_over is not None
                    await self.on_grace_over()
            for connection in list(self.server_state.connections):
                if _busy(connection):
                    _close_after_answer(connection)  # one begun before the stop (the first pass runs at once)
                    idle_since.pop(connection, None)  # answered with Connection: close, then closed by uvicorn
                elif now - idle_since.setdefault(connection, now) >= self.idle_close_s:
                    connection.shutdown()  # idle: uvicorn closes it
            await asyncio.sleep(POLL_S)
        log.info("open connections drained in %.1f s", time.monotonic() - started)
        if grace is not None:  # uvicorn waits the rest of the grace for requests still running, then cancels them
            self.config.timeout_graceful_shutdown = max(0.0, grace - (time.monotonic() - started))  # fraction kept
        await super().shutdown(sockets=None)
