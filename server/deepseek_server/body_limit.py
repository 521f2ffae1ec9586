"""Refuse request bodies over `--max-body-bytes` with OpenAI's 413 before any handler reads them."""

from __future__ import annotations

import json
from typing import Any

from deepseek_server.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimitMiddleware:
    """Pure ASGI: checks Content-Length, and counts bytes of chunked bodies while buffering them."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                await self._client_left(scope, send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying(b"".join(chunks), receive), send)

    @staticmethod
    async def _client_left(scope: Scope, send: Any) -> None:
        """The client closed the connection before its body was all sent: answered (to no one; the server drops it)
        with the 499 of every request whose client left before its answer, so that is what it is recorded as."""
        scope.setdefault("state", {})["error_code"] = "client_disconnected"
        await send({"type": "http.response.start", "status": 499, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope: Scope, send: Any) -> None:
        scope.setdefault("state", {})["error_code"] = "request_too_large"
        payload = json.dumps(error_body(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes). "
            "Send a shorter prompt.", "invalid_request_error", None, "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def replaying(body: bytes, receive: Any) -> Any:
    """`receive` that first hands out `body`, already read, as the whole request body."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
