"""Relay a validated OpenAI request to an engine that speaks OpenAI itself (vLLM), inside the same gateway.

Admission, cache, usage accounting, metrics and the audit fields are the same as for the builtin engine; only the
engine call differs. Streams are relayed as the engine's bytes: the gateway always asks for usage (it needs the
token count for limits and audit), reads it from the one chunk that carries it, and removes that chunk again when
the client did not ask for it, so the client gets exactly what the engine would have sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from deepseek_server.auth.tokens import Principal
from deepseek_server.cache import is_deterministic, request_fingerprint
from deepseek_server.engine.engine_http import EngineConnectionError, EngineResponse, EngineTimeout
from deepseek_server.engine.openai_upstream import OpenAIUpstreamEngine, engine_error
from deepseek_server.errors import APIError
from deepseek_server.generation import admit, release, serve_cached, with_headers
from deepseek_server.limits.limiter import Lease
from deepseek_server.response_bodies import Kind
from deepseek_server.schemas import SamplingFields
from deepseek_server.services import Services

PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "text": "/v1/completions"}
_USAGE = b'"usage":{'
_USAGE_NULL = b',"usage":null'
_FINISHED = b'"finish_reason":"'
_FINGERPRINT = b'"system_fingerprint"'
_DONE = b"data: [DONE]\n\n"
# engine responses whose end is still being read after their stream was answered (see `_StreamRelay.finish`)
_draining: set[asyncio.Task[None]] = set()


async def relay_call(services: Services, request: Request, principal: Principal, engine: OpenAIUpstreamEngine,
                     kind: Kind, body: SamplingFields, requested_max: int | None) -> Response:
    """Answer one chat or text completion through the engine, streamed or not."""
    ceiling = services.settings.max_new_tokens
    if requested_max is not None and requested_max > ceiling:
        raise APIError(400, f"max_tokens is too large: {requested_max}. This server supports at most {ceiling} "
                       "completion tokens.", param="max_tokens", code="invalid_value")
    fingerprint = request_fingerprint(kind, body.model_dump(exclude_none=True))
    request.state.fingerprint = fingerprint
    request.state.stream = body.stream
    if not hasattr(request.state, "started"):  # set by the recording middleware when it is installed
        request.state.started = time.perf_counter()
    cacheable = services.cache is not None and not body.stream and is_deterministic(body.temperature, body.seed)
    if cacheable:
        cached = await serve_cached(services, request, principal, kind, fingerprint)
        if cached is not None:
            return cached
    request.state.cache = "miss"
    raw = await request.body()  # already read and validated by FastAPI; relayed as sent
    # the engine counts the prompt; the completion part is known now (what the prompt used is charged at release)
    reserve = (requested_max or ceiling) * (body.n or 1)
    lease = await admit(services, request, principal, reserve)
    if body.stream:
        client_usage = bool(body.stream_options and body.stream_options.include_usage)
        document = json.loads(raw)
        document["stream_options"] = {**(document.get("stream_options") or {}), "include_usage": True}
        try:
            upstream = await _racing_disconnect(request, engine.open_stream(PATHS[kind],
                                                                            json.dumps(document).encode()))
        except BaseException:
            await release(services, lease, 0)
            raise
        return with_headers(_RelayedStreamResponse(_StreamRelay(services, request, engine, kind, upstream, lease,
                                                                client_usage)), request)
    try:
        response = await _racing_disconnect(request, engine.post(PATHS[kind], raw))
    except BaseException:
        await release(services, lease, 0)
        raise
    if response.status_code != 200:
        await release(services, lease, 0)
        raise engine_error(response.status_code, response.content)
    answer = response.json()
    prompt_tokens, completion_tokens = _usage_counts(answer.get("usage"))
    _account(services, request, prompt_tokens, completion_tokens)
    await release(services, lease, prompt_tokens + completion_tokens)
    if cacheable and services.cache is not None:
        await services.cache.put(fingerprint, answer, principal)
    return with_headers(Response(response.content, media_type="application/json"), request, b"miss")


async def _racing_disconnect(request: Request, call: Any) -> Any:
    """Await `call` unless the client disconnects first; then the call is cancelled, which closes its connection
    to the engine, and the engine aborts the request."""
    task = asyncio.ensure_future(call)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        request.state.error_code = "client_disconnected"
        raise APIError(499, "The client closed the connection before the answer was ready.",
                       code="client_disconnected")
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage_counts(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _account(services: Services, request: Request, prompt_tokens: int, completion_tokens: int) -> None:
    request.state.usage = (prompt_tokens, completion_tokens)
    services.metrics.prompt_tokens.inc(prompt_tokens)
    services.metrics.generated_tokens.inc(completion_tokens)


def _take_usage(events: bytes, client_usage: bool) -> tuple[bytes, dict[str, Any] | None]:
    """Find the usage in whole SSE events; drop its chunk (if it carries nothing else) when the client did not ask."""
    usage = None
    kept: list[bytes] = []
    for event in events.split(b"\n\n"):
        if _USAGE in event and event.startswith(b"data: "):
            document = json.loads(event[6:])
            usage = document.get("usage")
            if not client_usage and not document.get("choices"):
                continue
            if not client_usage:
                document.pop("usage", None)
                event = b"data: " + json.dumps(document, separators=(",", ":")).encode()
        kept.append(event)
    return b"\n\n".join(kept), usage


def _with_fingerprint(events: bytes, fingerprint: bytes) -> bytes:
    """vLLM puts `system_fingerprint` on each choice's last chunk, or, when usage is asked for, only on the usage
    chunk: with that chunk removed, the last chunks get it back, as the client would have had them."""
    out: list[bytes] = []
    for event in events.split(b"\n\n"):
        if _FINISHED in event and _FINGERPRINT not in event and event.endswith(b"}"):
            event = event[:-1] + b',"system_fingerprint":' + fingerprint + b"}"
        out.append(event)
    return b"\n\n".join(out)


class _StreamRelay:
    """One relayed stream: the engine's events to the client, then the accounting, exactly once, however it ends."""

    def __init__(self, services: Services, request: Request, engine: OpenAIUpstreamEngine, kind: Kind,
                 upstream: EngineResponse, lease: Lease | None, client_usage: bool) -> None:
        self.services, self.request, self.engine, self.kind = services, request, engine, kind
        self.upstream, self.lease, self.client_usage = upstream, lease, client_usage
        self.usage: dict[str, Any] | None = None
        self.events_sent = 0
        self.finished = False
        self.answered = False  # `[DONE]` relayed: the client's stream is complete, whatever the engine sends after
        self.accounted: int | None = None  # the tokens counted by `_account`
        self.body = upstream.aiter_arrived()

    async def events(self) -> AsyncIterator[bytes]:
        services, request, client_usage = self.services, self.request, self.client_usage
        started = request.state.started
        fingerprint = self.engine.system_fingerprint
        pending = b""
        first = True
        # A client that leaves is noticed here even while the engine is silent (queued, or in a long prefill):
        # closing the upstream response drops the engine connection, and the engine aborts the request.
        watcher = asyncio.ensure_future(_close_on_disconnect(request, self.upstream))
        try:
            async for data in self.body:  # chunks that came together go out together
                if first:
                    first = False
                    services.metrics.ttft.labels(self.kind).observe(time.perf_counter() - started)
                pending = pending + data if pending else data
                if pending.endswith(b"\n\n"):  # the usual case: whole events, relayed without copying
                    events, pending = pending, b""
                else:
                    end = pending.rfind(b"\n\n")
                    if end < 0:
                        continue
                    events, pending = pending[:end + 2], pending[end + 2:]
                self.events_sent += events.count(b"data: ")
                if _USAGE in events:
                    events, found = _take_usage(events, client_usage)
                    self.usage = found or self.usage
                if not client_usage:
                    if _USAGE_NULL in events:
                        events = events.replace(_USAGE_NULL, b"")
                    if fingerprint and _FINISHED in events:
                        events = _with_fingerprint(events, fingerprint)
                if events.endswith(_DONE):
                    # The stream is complete. The engine sends the end of its chunked body after `[DONE]`, in a
                    # write of its own (later still when it is busy with many streams): the client's response ends
                    # with these events, in the same write, and `finish` has the engine's end read in the background.
                    self.answered = True
                    self._account()  # before the response ends: its record is taken then
                    yield events
                    return
                if events:
                    yield events
            if pending:
                yield pending
        except (EngineConnectionError, EngineTimeout) as exc:
            if not await request.is_disconnected():
                if isinstance(exc, EngineTimeout):
                    code, message = "engine_timeout", f"The inference engine stopped sending: {exc}."
                else:
                    self.engine.lost(f"{exc} while streaming ({self.engine.base_url})")
                    code, message = "engine_unavailable", "The inference engine stopped while answering; retry."
                request.state.error_code = code
                error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
                yield b"data: " + json.dumps(error).encode() + b"\n\n"
        finally:
            watcher.cancel()
            await self.finish()

    async def finish(self) -> None:
        """Close the engine's stream and account the tokens; also when the stream never started (client gone)."""
        if self.finished:
            return
        self.finished = True
        with anyio.CancelScope(shield=True):  # a client leaving mid-stream must still close and account
            if self.answered:
                # read the engine's end in the background: the connection then goes back to the pool for reuse
                task = asyncio.ensure_future(_read_to_end(self.upstream, self.body))
                _draining.add(task)
                task.add_done_callback(_draining.discard)
            else:
                await self.upstream.aclose()
            await release(self.services, self.lease, self.accounted if self.accounted is not None else self._account())

    def _account(self) -> int:
        """Count the stream's tokens, once; the total. Cut short, one token per event relayed, so limits still see
        the work done."""
        if self.usage is not None:
            prompt_tokens, completion_tokens = _usage_counts(self.usage)
        else:
            prompt_tokens, completion_tokens = 0, self.events_sent
        _account(self.services, self.request, prompt_tokens, completion_tokens)
        self.accounted = prompt_tokens + completion_tokens
        return self.accounted


async def _read_to_end(upstream: EngineResponse, body: AsyncIterator[bytes]) -> None:
    """Read what is left of an engine's answer whose stream was already answered (its chunked body's end), then close
    it: cleanly ended, its connection is reused; anything else, or a read timeout, drops the connection."""
    try:
        async for _ in body:
            pass
    except (EngineConnectionError, EngineTimeout):
        pass
    finally:
        await upstream.aclose()


class _RelayedStreamResponse(StreamingResponse):
    """Starlette never starts the body of a response whose client has already gone: finish the relay anyway.

    The relay notices a client that leaves by itself (it then closes the engine's stream, which ends the body), so
    the response runs without Starlette's task group listening for the disconnect beside each stream."""

    def __init__(self, relay: _StreamRelay) -> None:
        super().__init__(relay.events(), media_type="text/event-stream")
        self.relay = relay

    async def stream_response(self, send: Any) -> None:
        """Starlette's, except that the events ending in `[DONE]` end the response in the same message, so the
        client gets them and the end of the body in one write; the limiter's slot is released after it."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for events in self.body_iterator:
            ended = self.relay.answered
            await send({"type": "http.response.body", "body": events, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            raise ClientDisconnect() from None
        finally:
            await self.relay.finish()


async def _close_on_disconnect(request: Request, upstream: EngineResponse) -> None:
    await _wait_for_disconnect(request)
    # shielded: the stream's own clean-up cancels this task, and a close cut short would leave the engine running
    await asyncio.shield(upstream.aclose())

