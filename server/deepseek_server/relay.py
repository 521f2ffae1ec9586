"""Relay a validated OpenAI request to an engine that speaks OpenAI itself (vLLM), inside the same gateway.

Admission, cache, usage accounting, metrics and the audit fields are the same as for the builtin engine; only the
engine call differs. Streams are relayed as the engine's bytes: the gateway always asks for usage (it needs the
token count for limits and audit), reads it from the one chunk that carries it, and removes that chunk again when
the client did not ask for it, so the client gets exactly what the engine would have sent it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from deepseek_server.auth.tokens import Principal
from deepseek_server.cache import is_deterministic
from deepseek_server.engine.engine_http import EngineConnectionError, EngineResponse, EngineTimeout
from deepseek_server.engine.openai_upstream import OpenAIUpstreamEngine, engine_error
from deepseek_server.errors import APIError
from deepseek_server.generation import admit, check_ceiling, release, release_now, serve_cached, with_headers
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
# how an engine reports a request it refused once its stream had begun (vLLM: an out-of-vocabulary `logit_bias`, a
# grammar it cannot compile): one event with an error object in place of a chunk, then `[DONE]`
_ERROR_EVENT = b'data: {"error"'
# engine responses whose end is still being read after their stream was answered (see `_StreamRelay.finish`)
_draining: set[asyncio.Task[None]] = set()
T = TypeVar("T")


def _fingerprint(services: Services, kind: Kind, body: SamplingFields) -> str:
    """The request's keyed fingerprint (audit, history, response-cache key)."""
    return services.request_keys.request_fingerprint(kind, body.model_dump(exclude_none=True))


async def relay_call(services: Services, request: Request, principal: Principal, engine: OpenAIUpstreamEngine,
                     kind: Kind, body: SamplingFields, requested_max: int | None,
                     max_param: str = "max_tokens") -> Response:
    """Answer one chat or text completion through the engine, streamed or not. `max_param`: the parameter
    `requested_max` came from (chat's `max_completion_tokens` or `max_tokens`)."""
    ceiling = services.settings.max_new_tokens
    check_ceiling(requested_max, ceiling, max_param)
    request.state.stream = body.stream
    if not hasattr(request.state, "started"):  # set by the recording middleware when it is installed
        request.state.started = time.perf_counter()
    cacheable = services.cache is not None and not body.stream and is_deterministic(body.temperature, body.seed)
    fingerprint = None
    if cacheable:
        fingerprint = request.state.fingerprint = _fingerprint(services, kind, body)
        cached = await serve_cached(services, request, principal, kind, fingerprint)
        if cached is not None:
            return cached
    request.state.cache = "miss"
    raw = _without_null_parameters(await request.body())  # already read and validated; relayed as sent
    # `max_tokens: 0` (with `echo`: the prompt scored) reserves no completion; not sent, the ceiling
    completion = ceiling if requested_max is None else requested_max
    reserve = prompt_bound(raw, engine.max_model_len) + completion * body.choices()
    lease = await admit(services, request, principal, reserve)
    client_left = asyncio.ensure_future(_wait_for_disconnect(request))
    if body.stream:
        client_usage = bool(body.stream_options and body.stream_options.include_usage)
        try:
            upstream = await _unless_client_leaves(request, client_left,
                                                   engine.open_stream(PATHS[kind], _asking_for_usage(raw, body)))
        except BaseException:
            client_left.cancel()
            await release(services, lease, 0)
            raise
        finally:
            # the request's fingerprint (for the audit) once the engine has the request: not on the way to it
            request.state.fingerprint = _fingerprint(services, kind, body)
        return with_headers(_RelayedStreamResponse(_StreamRelay(services, request, engine, kind, upstream, lease,
                                                                client_usage, client_left)), request)
    try:
        response = await _unless_client_leaves(request, client_left, engine.post(PATHS[kind], raw))
    except BaseException:
        await release(services, lease, 0)
        raise
    finally:
        client_left.cancel()
        if fingerprint is None:
            request.state.fingerprint = _fingerprint(services, kind, body)
    if response.status_code != 200:
        await release(services, lease, 0)
        raise engine_error(response.status_code, response.content)
    answer = response.json()
    prompt_tokens, completion_tokens = _usage_counts(answer.get("usage"))
    _account(services, request, prompt_tokens, completion_tokens)
    await release(services, lease, prompt_tokens + completion_tokens)
    if cacheable and services.cache is not None:
        await services.cache.put(request.state.fingerprint, answer, principal)
    return with_headers(Response(response.content, media_type="application/json"), request, b"miss")


def prompt_bound(raw: bytes, max_model_len: int) -> int:
    """An upper bound of a relayed request's prompt tokens, reserved at admission: the engine tokenizes the prompt,
    this process does not. The prompt's text (messages, tools) is inside the request's body, and a byte-level BPE
    (DeepSeek's tokenizers) makes at most one token of each byte of text, so the body's size bounds it; a prompt
    longer than the context is refused by the engine. The difference to the engine's `usage` (the chat template's
    own tokens included) is settled at release."""
    return min(len(raw), max_model_len) if max_model_len > 0 else len(raw)


async def _unless_client_leaves(request: Request, client_left: asyncio.Task[None], call: Awaitable[T]) -> T:
    """Await `call` in this task unless the client disconnects first (`client_left` ends): then this task is
    cancelled where `call` waits, which closes its connection to the engine, and the engine aborts the request; the
    client gets (and the audit records) a 499. One task watches the client for the whole request, stream included,
    instead of a task per call and another for the stream."""
    if client_left.done() and not client_left.cancelled():
        if inspect.iscoroutine(call):
            call.close()  # never started: nothing went to the engine
        raise _client_gone(request)
    current = asyncio.current_task()
    assert current is not None
    left = False

    def on_client_left(watch: asyncio.Task[None]) -> None:
        nonlocal left
        if not watch.cancelled():
            left = True
            current.cancel()

    client_left.add_done_callback(on_client_left)
    try:
        return await call
    except asyncio.CancelledError:
        if not left:
            raise
        current.uncancel()
        raise _client_gone(request) from None
    finally:
        client_left.remove_done_callback(on_client_left)


def _client_gone(request: Request) -> APIError:
    request.state.error_code = "client_disconnected"
    return APIError(499, "The client closed the connection before the answer was ready.", code="client_disconnected")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _without_null_parameters(raw: bytes) -> bytes:
    """The request's JSON without top-level `null` members. In OpenAI's API (and this server's schema) `null` means
    "not sent", but vLLM refuses it for some parameters (`"n": null` on /v1/completions is a 400 there). A body
    without the bytes `null` anywhere (the usual case) is relayed untouched, as is one whose `null` is elsewhere."""
    if b"null" not in raw:
        return raw
    document = json.loads(raw)
    kept = {name: value for name, value in document.items() if value is not None}
    return raw if len(kept) == len(document) else json.dumps(kept).encode()


def _asking_for_usage(raw: bytes, body: SamplingFields) -> bytes:
    """The request's JSON with `stream_options.include_usage` set. Without `stream_options` in it (the usual case)
    the member is added before the closing brace, the client's bytes otherwise kept as sent; else the JSON is parsed
    and written again."""
    if "stream_options" not in body.model_fields_set:
        end = len(raw.rstrip(b" \t\r\n"))
        if raw.lstrip(b" \t\r\n")[:1] == b"{" and raw[end - 1:end] == b"}":  # an object in UTF-8, not empty
            return raw[:end - 1] + b',"stream_options":{"include_usage":true}}'
    document = json.loads(raw)
    document["stream_options"] = {**(document.get("stream_options") or {}), "include_usage": True}
    return json.dumps(document).encode()


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
            document = orjson.loads(event[6:])
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
                 upstream: EngineResponse, lease: Lease | None, client_usage: bool,
                 client_left: asyncio.Task[None]) -> None:
        self.services, self.request, self.engine, self.kind = services, request, engine, kind
        self.upstream, self.lease, self.client_usage = upstream, lease, client_usage
        self.client_left = client_left  # ends when the client disconnects; cancelled by `finish`
        self.usage: dict[str, Any] | None = None
        self.events_sent = 0
        self.error_events = 0  # the engine's error events among them, which carry no token
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
        # A client that leaves is noticed even while the engine is silent (queued, or in a long prefill): closing
        # the upstream response drops the engine connection, and the engine aborts the request.
        self.client_left.add_done_callback(self._close_upstream)
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
                if _ERROR_EVENT in events:
                    events = self._engine_errors(events)
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
                    code, message, status = "engine_timeout", f"The inference engine stopped sending: {exc}.", 504
                else:
                    self.engine.lost(f"{exc} while streaming")
                    code, message = "engine_unavailable", "The inference engine stopped while answering; retry."
                    status = 503
                request.state.error_code = code
                if getattr(request.state, "failed_status", None) is None:  # counted as its status unstreamed
                    request.state.failed_status = status
                error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
                yield b"data: " + json.dumps(error).encode() + b"\n\n" + _DONE  # then [DONE], as vLLM ends a stream
        finally:
            self.client_left.remove_done_callback(self._close_upstream)
            await self.finish()

    def _close_upstream(self, client_left: asyncio.Task[None]) -> None:
        if not client_left.cancelled():
            self.upstream.close_now()

    async def finish(self) -> None:
        """Close the engine's stream and account the tokens; also when the stream never started (client gone)."""
        if self.finished:
            return
        self.finished = True
        self.client_left.cancel()
        # Nothing here waits before the release, so a client leaving mid-stream (the task cancelled) cannot cut the
        # close or the accounting short; a release that waits for Redis shields itself.
        if self.answered:
            # read the engine's end in the background: the connection then goes back to the pool for reuse
            task = asyncio.ensure_future(_read_to_end(self.upstream, self.body))
            _draining.add(task)
            task.add_done_callback(_draining.discard)
        else:
            self.upstream.close_now()
        tokens = self.accounted if self.accounted is not None else self._account()
        if not release_now(self.services, self.lease, tokens):
            await release(self.services, self.lease, tokens)

    def _engine_errors(self, events: bytes) -> bytes:
        """The engine's error events in OpenAI's error shape, as its error answers are (`engine_error`); the first
        one's code is the request's (the stream's status is 200 already)."""
        out: list[bytes] = []
        for event in events.split(b"\n\n"):
            if event.startswith(_ERROR_EVENT):
                self.error_events += 1
                try:
                    document = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    document = None
                error = document.get("error") if isinstance(document, dict) else None
                code = error.get("code") if isinstance(error, dict) else None
                # vLLM puts the status it would have answered in `code`
                status = code if isinstance(code, int) and 400 <= code < 600 else 500
                failure = engine_error(status, event[6:])
                if getattr(self.request.state, "error_code", None) is None:
                    self.request.state.error_code = failure.code or failure.type
                if getattr(self.request.state, "failed_status", None) is None:  # counted as its status unstreamed
                    self.request.state.failed_status = failure.status
                event = b"data: " + json.dumps(failure.body()).encode()
            out.append(event)
        return b"\n\n".join(out)

    def _account(self) -> int:
        """Count the stream's tokens, once; the total. Cut short, one token per event relayed (not an error event,
        not `[DONE]`), so limits still see the work done."""
        if self.usage is not None:
            prompt_tokens, completion_tokens = _usage_counts(self.usage)
        else:
            prompt_tokens = 0
            completion_tokens = max(0, self.events_sent - self.error_events - self.answered)
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
