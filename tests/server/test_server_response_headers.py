"""Response headers under the HTTP protocol `deepseek-server serve` runs: checked as uvicorn checks them (a header
that would split the response is refused), with the checks remembered (`http_protocol.RememberedCheck`)."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
import uvicorn
from deepseek_server.http_protocol import OpenAIErrorsHTTPProtocol, RememberedCheck, remember_header_checks

from devcluster.testing.polling import wait_for
from devcluster.testing.ports import bound_socket

HEADERS = {
    "/ok": [(b"x-ratelimit-limit-requests", b"1000"), (b"x-cache", b"miss")],
    "/value-with-crlf": [(b"x-request-id", b"req-1\r\nset-cookie: session=stolen")],
    "/value-with-nul": [(b"x-request-id", b"req-1\x00")],
    "/name-with-space": [(b"x bad", b"1")],
    "/name-with-colon": [(b"set-cookie: a", b"1")],
}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), *HEADERS[scope["path"]]]})
    await send({"type": "http.response.body", "body": b"answered"})


def test_the_checks_are_remembered_in_uvicorns_httptools_protocol() -> None:
    from uvicorn.protocols.http import httptools_impl

    assert remember_header_checks()
    assert isinstance(httptools_impl.HEADER_RE, RememberedCheck)
    assert isinstance(httptools_impl.HEADER_VALUE_RE, RememberedCheck)


def test_a_header_that_would_split_the_response_is_refused_every_time_and_the_rest_are_sent() -> None:
    sock = bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="critical",
                            http=OpenAIErrorsHTTPProtocol, server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for("the server to listen", lambda: server.started, timeout=30, interval=0.02)
        url = f"http://127.0.0.1:{port}"
        for _ in range(3):  # the first time scanned, then answered from the table (refusals: scanned each time)
            ok = httpx.get(f"{url}/ok", timeout=10)
            assert ok.status_code == 200 and ok.text == "answered"
            assert ok.headers["x-ratelimit-limit-requests"] == "1000" and ok.headers["x-cache"] == "miss"
            for path in ("/value-with-crlf", "/value-with-nul", "/name-with-space", "/name-with-colon"):
                # uvicorn refuses the header before any byte of the response is written, and closes the connection
                with pytest.raises(httpx.RemoteProtocolError):
                    httpx.get(f"{url}{path}", timeout=10)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
