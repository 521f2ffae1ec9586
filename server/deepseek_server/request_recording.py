"""Record every request: Prometheus counters and latency, and one audit record for each API (/v1) request.

Pure ASGI middleware, so it sees the final status of every response (including ones refused by auth, limits or the
body size check) and, for streams, waits for the last byte before queueing the record. Queueing is synchronous and
does no I/O (`AuditLog` builds and writes records in the background), so the record is taken even when the request is
being cancelled, without a shielded cancel scope.

A stream that fails after its 200 (an error event, then `[DONE]`) is counted in the metrics under the status the same
failure is answered with unstreamed (`state["failed_status"]`, set where the error event is sent): a client's SDK
raises it as that error, and the post-switch analysis and the error-rate alert, which count 5xx, see it. Its audit
record keeps the 200 that was sent, with the error's code.

An exception that escapes the app before its response began is answered here, as a 500 in OpenAI's shape with the
request's `x-request-id` (Starlette's own handler for it runs in its outermost middleware, outside this one, where
the id is unknown); only the error path pays for it.
"""

from __future__ import annotations

import itertools
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge
from starlette.requests import Request

from deepseek_server.audit import AuditLog
from deepseek_server.errors import unexpected_error_response
from deepseek_server.metrics import ServerMetrics
from deepseek_server.redaction import Redactor

PROMPT_PREVIEW_CHARS = 200
# What the operator's autoscaler reads (spec.autoscaling.metric InFlightRequests): API requests begun and not yet
# answered to their last byte, streams included, on this replica.
IN_FLIGHT_METRIC = "deepseek_requests_in_flight"

# request ids: a random per-process prefix (unique across replicas) and a counter (cheaper than uuid4 per request),
# in decimal (a formatted width, e.g. `:010x`, takes longer than the rest of the id)
_ID_PREFIX = f"req-{secrets.token_hex(6)}-"
_ID_COUNTER = itertools.count(1)


_NO_USAGE = (None, None)
_NOT_STARTED, _STARTED, _ENDED = 0, 1, 2  # how far a response has gone out
_perf_counter = time.perf_counter
_time = time.time
_second_text: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text
_day_text: tuple[int, str] = (-1, "")  # the last day (days since the epoch) formatted, and its text
_TWO_DIGITS = [f"{number:02d}" for number in range(60)]
_MILLIS = [f".{millis:03d}+00:00" for millis in range(1000)]  # what follows the second, for each millisecond


def utc_timestamp(now: float) -> str:
    """`now` (seconds since the epoch) as `datetime.isoformat(timespec="milliseconds")` writes it in UTC; the
    date is formatted once per day, the time of day once per second."""
    global _second_text, _day_text
    second = int(now)
    micros = round((now - second) * 1_000_000)  # as datetime rounds: the fraction to whole microseconds, half to even
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    if _second_text[0] != second:
        day, in_day = divmod(second, 86_400)
        if _day_text[0] != day:
            _day_text = (day, datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%dT"))
        hours, in_hour = divmod(in_day, 3600)
        minutes, seconds = divmod(in_hour, 60)
        _second_text = (second, f"{_day_text[1]}{_TWO_DIGITS[hours]}:{_TWO_DIGITS[minutes]}:{_TWO_DIGITS[seconds]}")
    return _second_text[1] + _MILLIS[micros // 1000]


class RequestRecordingMiddleware:
    def __init__(self, app: Any, metrics: ServerMetrics, audit: AuditLog | None, redactor: Redactor) -> None:
        self.app = app
        self.metrics = metrics
        self.audit = audit
        self.redactor = redactor
        self._observe = metrics.api_requests.observe
        # a plain count the gauge reads when scraped: two Prometheus value updates (each under a lock) per request
        # cost more than the rest of the metrics
        self.in_flight_count = 0
        self.in_flight = Gauge(IN_FLIGHT_METRIC, "API (/v1) requests being answered, streams until their last byte",
                               registry=metrics.registry)
        self.in_flight.set_function(lambda: self.in_flight_count)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = _perf_counter()
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["started"] = started
        request_id = state["request_id"] = f"{_ID_PREFIX}{next(_ID_COUNTER)}"
        status = 500
        progress = _NOT_STARTED
        api = scope["path"].startswith("/v1/")
        if api:
            self.in_flight_count += 1

        async def recording_send(message: dict[str, Any]) -> None:
            nonlocal status, progress
            kind = message["type"]
            if kind == "http.response.start":
                status, progress = message["status"], _STARTED
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
                await send(message)
            elif kind == "http.response.body" and not message.get("more_body", False):
                await send(message)
                # the last byte is out: what `_record` does, written out here (a call less) because all requests
                # but those that fail or lose their client end here
                progress = _ENDED
                elapsed = _perf_counter() - started
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self._observe(route, state.get("failed_status") or status, elapsed)
                if api:
                    self.in_flight_count -= 1
                    if self.audit is not None:  # built by the audit writer, with the others of its batch
                        self.audit.record_later((audit_record, scope, state, request_id, route, status, elapsed,
                                                 self.redactor, _time()))
            else:
                await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception as exc:
            if progress != _NOT_STARTED:  # a response under way cannot become an error: the connection is cut
                state.setdefault("error_code", "internal_error")
                raise
            # answered here rather than by Starlette's outermost middleware, which runs outside this one: the 500
            # then carries `x-request-id`, like every other answer, and is recorded as it is sent
            response = unexpected_error_response(Request(scope), exc)
            await response(scope, receive, recording_send)
        finally:  # also when the client went away mid-stream, or the app raised
            if progress != _ENDED:
                if progress == _STARTED:  # begun but never ended (the app's own failure has its code): the client left
                    state.setdefault("error_code", "client_disconnected")
                self._record(scope, state, request_id, status, _perf_counter() - started, api)

    def _record(self, scope: dict[str, Any], state: dict[str, Any], request_id: str, status: int, elapsed: float,
                api: bool) -> None:
        """Count a request that took `elapsed` seconds, and queue its audit record if it is an API request."""
        # the matched route's template (bounded cardinality), or 'unmatched'
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self._observe(route, state.get("failed_status") or status, elapsed)
        if api:
            self.in_flight_count -= 1
            if self.audit is not None:  # built by the audit writer, with the others of its batch
                self.audit.record_later((audit_record, scope, state, request_id, route, status, elapsed,
                                         self.redactor, _time()))


def audit_record(scope: dict[str, Any], state: dict[str, Any], request_id: str, route: str, status: int,
                 elapsed: float, redactor: Redactor, at: float | None = None) -> dict[str, Any]:
    """The audit record of one request answered at `at` (seconds since the epoch; default now); fields a handler did
    not reach stay null. The request's fingerprint is keyed where it is computed (`RequestKeys.request_fingerprint`);
    prompt text (with `--audit-prompts`) is recorded only masked."""
    get = state.get
    principal = get("principal")
    usage = get("usage") or _NO_USAGE
    client = scope.get("client")
    if principal is None:
        uid = subject = token_id = env = None
    else:
        uid, subject, token_id, env = principal.uid, principal.subject, principal.token_id, principal.env
    # a dict display of more than 15 pairs is built pair by pair, the dict growing twice on the way: the first 15
    # are one display (sized once), the last 4 go in after
    record: dict[str, Any] = {
        "time": utc_timestamp(time.time() if at is None else at),
        "request_id": request_id,
        "key_uid": uid,
        "subject": subject,
        "token_id": token_id,
        "env": env,
        "method": scope["method"],
        "route": route,
        "path": scope["path"],
        "model": get("model"),
        "prompt_tokens": usage[0],
        "completion_tokens": usage[1],
        "status": status,
        "error_code": get("error_code"),
        # two decimals, halves up (round(ms, 2) formats and parses a decimal string: dearer than the other fields)
        "latency_ms": int(elapsed * 100_000 + 0.5) / 100,
    }
    record["fingerprint"] = get("fingerprint")
    record["cache"] = get("cache")
    record["stream"] = get("stream")
    record["client"] = client[0] if client else None
    if "prompt_text" in state:
        record["prompt_preview"] = redactor.preview(state["prompt_text"], PROMPT_PREVIEW_CHARS)
    elif "prompt_preview" in state:  # already cut: its last word may be part of a secret, so it goes
        preview = str(state["prompt_preview"])
        if len(preview) >= PROMPT_PREVIEW_CHARS:
            preview = preview[:max(preview.rfind(" "), 0)]
        record["prompt_preview"] = redactor.mask(preview)
    return record
