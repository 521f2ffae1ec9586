"""From a validated OpenAI request to a response: length checks, rate-limit admission, cache, engine, rendering."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deepseek_server.auth.tokens import Principal
from deepseek_server.cache import is_deterministic
from deepseek_server.engine.base import (
    OPENAI_FINISH_REASONS,
    Engine,
    EngineBusy,
    GenerationRequest,
    GenerationResult,
    GenerationStream,
    TextDelta,
    TokenLogprob,
    merged_events,
)
from deepseek_server.engine.capabilities import capabilities_of
from deepseek_server.engine.openai_upstream import engine_unavailable
from deepseek_server.errors import ADMISSION_HEADERS, APIError, admission_headers
from deepseek_server.limits.decision import Decision
from deepseek_server.limits.limiter import Lease
from deepseek_server.limits.policy import UNLIMITED
from deepseek_server.logprob_bodies import logprobs_body
from deepseek_server.response_bodies import Kind, TextChunks, chunk, full_body, sse, usage_body, usage_chunk
from deepseek_server.schemas import SamplingFields
from deepseek_server.services import Services

DISCONNECT_POLL_S = 0.25
R = TypeVar("R", bound=Response)
# completion ids: a random per-process prefix (unique across replicas) and a counter; 32 hex digits like a uuid4, whose
# getrandom call per request costs more than everything else in an id
_CALL_ID_PREFIX = secrets.token_hex(8)
_CALL_ID_COUNTER = itertools.count(1)


def new_call_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{_CALL_ID_PREFIX}{next(_CALL_ID_COUNTER):016x}"


@dataclass(frozen=True)
class PlannedCall:
    kind: Kind
    model: str
    prompt_tokens: int
    requests: list[GenerationRequest]
    stream: bool
    include_usage: bool
    fingerprint: str
    cacheable: bool


def serving_engine(services: Services, model: str) -> Engine:
    """The engine for `model`: 404 for another model, 503 while loading or shutting down."""
    engine = services.engine
    # First: a stopping engine is no longer ready either, and "not loaded yet" would send the client back here
    if services.shutting_down:
        raise APIError(503, "The server is shutting down; retry on another replica.", type="server_error",
                       code="shutting_down", headers={"retry-after": "1"})
    if engine is None or not engine.ready:
        reason = getattr(engine, "not_ready_reason", None)  # engines in another process say why
        if engine is not None and capabilities_of(engine).relays_openai:  # vLLM starting, or not reachable
            raise engine_unavailable(reason or "not ready")
        reason = f"loading failed: {services.load_error}" if services.load_error else reason
        detail = f" ({reason})" if reason else ""
        raise APIError(503, f"The model is not loaded yet{detail}; retry shortly.", type="server_error",
                       code="model_not_ready", headers={"retry-after": "5"})
    if model != engine.model_name:
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it. "
                       f"This server serves `{engine.model_name}`.", param="model", code="model_not_found")
    return engine


def check_token_shaping(engine: Engine, body: SamplingFields, json_schema: str | None) -> None:
    """400 for a `logit_bias` token id outside the vocabulary or a JSON schema the engine cannot enforce."""
    vocab_size = getattr(engine, "vocab_size", None)
    outside = [token for token, _ in body.logit_bias_pairs() if vocab_size is not None and token >= vocab_size]
    if outside:
        raise APIError(400, f"logit_bias has token ids outside the vocabulary (0..{vocab_size - 1}): "
                       f"{outside[:5]}.", param="logit_bias", code="invalid_value")
    check = getattr(engine, "check_json_schema", None)
    if json_schema is not None and check is not None:
        try:
            check(json_schema)
        except ValueError as exc:
            raise APIError(400, f"Invalid response_format: {exc}.", param="response_format",
                           code="invalid_value") from exc


def check_ceiling(requested_max: int | None, ceiling: int, max_param: str) -> None:
    """400 naming `max_param` (chat's `max_completion_tokens` or `max_tokens`, as sent) when it asks for more
    completion tokens than the server gives."""
    if requested_max is not None and requested_max > ceiling:
        raise APIError(400, f"{max_param} is too large: {requested_max}. This server supports at most {ceiling} "
                       "completion tokens.", param=max_param, code="invalid_value")


def plan_call(services: Services, engine: Engine, kind: Kind, body: SamplingFields, prompt_ids: list[int],
              requested_max: int | None, prompt_param: str, max_param: str = "max_tokens",
              fingerprint: str | None = None) -> PlannedCall:
    """Check lengths against the context and the server's ceiling, and expand `n` into engine requests.
    `max_param`: the parameter `requested_max` came from (chat's `max_completion_tokens` or `max_tokens`);
    `fingerprint`: the request's, where the caller has it already (several prompts of one request)."""
    settings = services.settings
    room = engine.max_model_len - len(prompt_ids)
    if room <= 0:
        raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. However, your "
                       f"{prompt_param} resulted in {len(prompt_ids)} tokens. Please reduce the length of the "
                       f"{prompt_param}.", param=prompt_param, code="context_length_exceeded")
    ceiling = min(settings.max_new_tokens, engine.max_new_tokens)
    check_ceiling(requested_max, ceiling, max_param)
    if requested_max is not None and requested_max > room:
        raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. However, you "
                       f"requested {len(prompt_ids) + requested_max} tokens ({len(prompt_ids)} in the "
                       f"{prompt_param}, {requested_max} in the completion). Please reduce the length of the "
                       f"{prompt_param} or completion.", param=prompt_param, code="context_length_exceeded")
    max_new = requested_max if requested_max is not None else min(ceiling, room)
    defaults = engine.sampling_defaults  # the model's own, as vLLM applies them
    temperature = defaults.get("temperature", 1.0) if body.temperature is None else body.temperature
    n = body.n or 1
    json_schema = body.response_format.schema_text() if body.response_format is not None else None
    check_token_shaping(engine, body, json_schema)
    requests = [
        GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=defaults.get("top_p", 1.0) if body.top_p is None else body.top_p,
            seed=None if body.seed is None else (body.seed + i) % (2**63),
            stop=tuple(body.stop_list()),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=body.logit_bias_pairs(),
            logprobs=getattr(body, "logprob_alternatives", lambda: None)(),
            json_schema=json_schema,
        )
        for i in range(n)
    ]
    if fingerprint is None:
        fingerprint = services.request_keys.request_fingerprint(kind, body.model_dump(exclude_none=True))
    cacheable = services.cache is not None and not body.stream and is_deterministic(body.temperature, body.seed)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return PlannedCall(kind=kind, model=engine.model_name, prompt_tokens=len(prompt_ids), requests=requests,
                       stream=body.stream, include_usage=include_usage,
                       fingerprint=fingerprint, cacheable=cacheable)


async def admit(services: Services, request: Request, principal: Principal, reserve_tokens: int = 0,
                hold: bool = True) -> Lease | None:
    """Take a rate-limit slot for the caller, reserving `reserve_tokens` (prompt + max_tokens) of its tokens per
    minute, or raise 429 with OpenAI's headers; None when there is nothing to release (auth is off, or a key limited
    only by its request rate in memory). `hold=False`: answered at once, no slot kept (and nothing to release)."""
    if services.authenticator.disabled or services.limiter.redis is None:
        return admit_now(services, request, principal, reserve_tokens, hold)
    limits = services.authenticator.limits_for(principal)
    lease = await services.limiter.acquire(principal.uid, limits, reserve_tokens, hold)
    request.scope.setdefault("state", {})[ADMISSION_HEADERS] = lease.decision.raw_headers()  # request.state's
    if not lease.decision.allowed:
        raise _refused(services, lease.decision)
    return lease


def admit_now(services: Services, request: Request, principal: Principal, reserve_tokens: int = 0,
              hold: bool = True) -> Lease | None:
    """`admit` where nothing needs awaiting: auth is off, or limits are in memory (`services.limiter.redis` is
    None)."""
    authenticator = services.authenticator
    if authenticator.disabled:
        return None
    state = authenticator.state  # `authenticator.limits_for(principal)`, one call level less
    uid = principal.uid
    limits = UNLIMITED if state is None else state.limits_for(uid)
    if limits.tpm is None and limits.parallel is None:  # a request rate alone: admitted with nothing to release
        headers = services.limiter.memory.admit_request(uid, limits)
        if headers is not None:
            request.scope.setdefault("state", {})[ADMISSION_HEADERS] = headers  # request.state's
            return None
    lease = services.limiter.acquire_now(principal.uid, limits, reserve_tokens, hold)
    request.scope.setdefault("state", {})[ADMISSION_HEADERS] = lease.decision.raw_headers()  # request.state's
    if not lease.decision.allowed:
        raise _refused(services, lease.decision)
    return lease


def _refused(services: Services, decision: Decision) -> APIError:
    """The 429 for a refused admission, counted."""
    services.metrics.ratelimit_rejections.labels(decision.kind or "requests").inc()
    what = {"requests": "requests per second", "tokens": "tokens per minute",
            "parallel": "parallel requests"}[decision.kind or "requests"]
    headers = decision.headers()
    return APIError(429, f"Rate limit reached for {what} on this API key. Retry after {headers['retry-after']} s.",
                    type="tokens" if decision.kind == "tokens" else "requests", code="rate_limit_exceeded",
                    headers=headers)


def release_now(services: Services, lease: Lease | None, tokens_used: int) -> bool:
    """Release `lease` at once where that needs no I/O (none was taken, or limits are in memory): True when done,
    False when the caller must `await release(...)`."""
    return lease is None or services.limiter.release_now(lease, tokens_used)  # in memory: nothing to await


async def release(services: Services, lease: Lease | None, tokens_used: int) -> None:
    if release_now(services, lease, tokens_used):
        return
    assert lease is not None
    with anyio.CancelScope(shield=True):  # a client leaving mid-stream must still free its slot in Redis
        await services.limiter.release(lease, tokens_used)


def with_headers(response: R, request: Request, cache: bytes | None = None) -> R:
    """`response` with the rate-limit headers `admit` made for this request, and `x-cache`."""
    response.raw_headers += admission_headers(request)
    if cache is not None:
        response.raw_headers.append((b"x-cache", cache))
    return response


async def serve_cached(services: Services, request: Request, principal: Principal, kind: Kind,
                       fingerprint: str) -> JSONResponse | None:
    """The cached answer under a fresh id (a hit counts against the request rate, in one limiter call), or None."""
    if services.cache is None:
        return None
    cached = await services.cache.get(fingerprint, principal)
    if cached is None:
        services.metrics.cache_misses.inc()
        return None
    await admit(services, request, principal, hold=False)
    services.metrics.cache_hits.inc()
    request.state.cache = "hit"
    usage = cached.get("usage") or {}
    request.state.usage = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
    call_id = new_call_id(kind)
    return with_headers(JSONResponse({**cached, "id": call_id, "created": int(time.time())}), request, b"hit")


async def respond(services: Services, request: Request, principal: Principal, engine: Engine,
                  call: PlannedCall) -> JSONResponse | StreamingResponse:
    request.state.fingerprint = call.fingerprint
    request.state.stream = call.stream
    if not hasattr(request.state, "started"):  # set by the recording middleware when it is installed
        request.state.started = time.perf_counter()
    call_id = new_call_id(call.kind)
    created = int(time.time())
    if call.cacheable:
        cached = await serve_cached(services, request, principal, call.kind, call.fingerprint)
        if cached is not None:
            return cached
    request.state.cache = "miss"
    reserve = call.prompt_tokens + sum(r.max_new_tokens for r in call.requests)
    lease = (admit_now(services, request, principal, reserve) if services.limiter.redis is None
             else await admit(services, request, principal, reserve))
    try:
        streams = [engine.submit(r) for r in call.requests]
    except BaseException:  # the slot must not stay taken by a request the engine refused
        await release(services, lease, 0)
        raise
    await _wait_admitted(services, request, streams, lease)
    services.metrics.prompt_tokens.inc(call.prompt_tokens)
    if call.stream:
        return with_headers(StreamingResponse(_stream(services, request, engine, call, streams, lease, call_id,
                                                      created), media_type="text/event-stream"), request)
    texts, reasons, completion_tokens, logprobs = await _collect(services, request, call, streams, lease)
    body = full_body(call.kind, call_id, created, call.model, texts,
                     [OPENAI_FINISH_REASONS.get(r, r) for r in reasons],
                     usage_body(call.prompt_tokens, completion_tokens),
                     None if call.requests[0].logprobs is None else
                     [logprobs_body(call.kind, entries) for entries in logprobs])
    if call.cacheable and services.cache is not None and "cancelled" not in reasons:
        await services.cache.put(call.fingerprint, body, principal)
    return with_headers(JSONResponse(body), request, b"miss")


def busy_error(exc: EngineBusy) -> APIError:
    return APIError(503, f"The model is busy: {exc}. Retry after {exc.retry_after_s} s.", type="server_error",
                    code="engine_overloaded", headers={"retry-after": str(exc.retry_after_s)})


class ClientGone(Exception):
    """The client closed its connection while its request waited for the engine."""


async def _until_admitted(request: Request, streams: list[GenerationStream]) -> None:
    """Wait until the engine runs every stream. While some wait in the engine's queue (for memory), the client is
    checked every DISCONNECT_POLL_S: one that left gives up its place at once (ClientGone), instead of holding it,
    ahead of the requests behind it, until it is admitted only to be cancelled."""
    waiting = [s.admission for s in streams if s.admission is not None and not s.admission.done()]
    while waiting:
        await asyncio.wait(waiting, timeout=DISCONNECT_POLL_S)
        waiting = [admission for admission in waiting if not admission.done()]
        if waiting and await request.is_disconnected():
            raise ClientGone
    for stream in streams:
        await stream.wait_admitted()  # raises what kept it from running


async def _wait_admitted(services: Services, request: Request, streams: list[GenerationStream],
                         lease: Lease | None) -> None:
    """Wait until the engine runs every stream (it may queue them for memory); 503 when it will not, 499 (recorded
    only: nobody reads it) when the client left meanwhile."""
    try:
        await _until_admitted(request, streams)
    except BaseException as exc:
        for stream in streams:
            stream.cancel()
        await release(services, lease, 0)
        if isinstance(exc, EngineBusy):
            raise busy_error(exc) from exc
        if isinstance(exc, ClientGone):
            raise APIError(499, "The client closed the connection while the request waited for the model.",
                           type="invalid_request_error", code="client_disconnected") from exc
        if isinstance(exc, Exception):
            raise APIError(500, f"The model failed while generating: {exc}", type="server_error") from exc
        raise


async def _collect(services: Services, request: Request, call: PlannedCall, streams: list[GenerationStream],
                   lease: Lease | None) -> tuple[list[str], list[str], int, list[list[TokenLogprob]]]:
    started = request.state.started
    logprobs: list[list[TokenLogprob]] = [[] for _ in streams]
    texts = [""] * len(streams)
    reasons = ["stop"] * len(streams)
    produced = 0
    first = True
    client_left = False

    async def watch_disconnect() -> None:
        nonlocal client_left
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        client_left = True
        for stream in streams:
            stream.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        async for index, event in merged_events(streams):
            if isinstance(event, TextDelta):
                produced += event.tokens
                logprobs[index].extend(event.logprobs)
                if event.text:
                    if first:
                        first = False
                        services.metrics.ttft.labels(call.kind).observe(time.perf_counter() - started)
                    texts[index] += event.text
            elif isinstance(event, GenerationResult):
                reasons[index] = event.finish_reason
    except EngineBusy as exc:
        raise busy_error(exc) from exc
    except RuntimeError as exc:
        raise APIError(500, f"The model failed while generating: {exc}", type="server_error") from exc
    finally:
        watcher.cancel()
        for stream in streams:
            stream.cancel()
        request.state.usage = (call.prompt_tokens, produced)
        services.metrics.generated_tokens.inc(produced)
        if not release_now(services, lease, call.prompt_tokens + produced):
            await release(services, lease, call.prompt_tokens + produced)
    if client_left:  # its streams were cancelled: an answer now would be a 200 (and a record of one) nobody receives
        raise APIError(499, "The client closed the connection while the model was generating.",
                       code="client_disconnected")
    return texts, reasons, produced, logprobs


async def _stream(services: Services, request: Request, engine: Engine, call: PlannedCall,
                  streams: list[GenerationStream], lease: Lease | None, call_id: str, created: int
                  ) -> AsyncIterator[str]:
    started = request.state.started
    produced = 0
    first = True
    kind, model, with_usage = call.kind, call.model, call.include_usage
    with_logprobs = call.requests[0].logprobs is not None
    text_offsets = [0] * len(streams)  # where each choice's next token starts in its text (completions' shape)
    text_chunks = TextChunks(kind, call_id, created, model, with_usage)
    try:
        if kind == "chat":
            for index in range(len(streams)):
                yield sse(chunk(kind, call_id, created, model, index, role=True, with_usage_field=with_usage))
        async for index, event in merged_events(streams):
            if isinstance(event, TextDelta):
                produced += event.tokens
                if event.text and first:
                    first = False
                    services.metrics.ttft.labels(kind).observe(time.perf_counter() - started)
                if event.text and not with_logprobs:
                    yield text_chunks.event(index, event.text)
                elif event.text or (with_logprobs and event.logprobs):
                    logprobs = None
                    if with_logprobs:
                        logprobs = logprobs_body(kind, event.logprobs, text_offsets[index])
                        text_offsets[index] += sum(len(e.token) for e in event.logprobs)
                    yield sse(chunk(kind, call_id, created, model, index, text=event.text,
                                    with_usage_field=with_usage, logprobs=logprobs))
            elif isinstance(event, GenerationResult):
                yield sse(chunk(kind, call_id, created, model, index,
                                finish_reason=OPENAI_FINISH_REASONS.get(event.finish_reason, event.finish_reason),
                                with_usage_field=with_usage))
        if with_usage:
            yield sse(usage_chunk(kind, call_id, created, model, usage_body(call.prompt_tokens, produced)))
        yield sse("[DONE]")
    except RuntimeError as exc:
        # the same error the failure gets unstreamed (`_collect`): 503 engine_overloaded when the engine ran out of
        # memory for this row, 500 when the model failed; counted under that status, recorded with its code
        failure = (busy_error(exc) if isinstance(exc, EngineBusy)
                   else APIError(500, f"The model failed while generating: {exc}", type="server_error"))
        request.state.error_code = failure.code or "generation_failed"
        request.state.failed_status = failure.status
        yield sse(failure.body())
        yield sse("[DONE]")  # after an error event too, as vLLM ends its streams
    finally:
        for stream in streams:
            stream.cancel()  # no-op for finished streams; frees the batch slot when the client left
        request.state.usage = (call.prompt_tokens, produced)
        services.metrics.generated_tokens.inc(produced)
        if not release_now(services, lease, call.prompt_tokens + produced):
            await release(services, lease, call.prompt_tokens + produced)
