"""An OpenAI-compatible engine server (vLLM) on localhost, spoken to over pooled HTTP/1.1 connections.

Readiness is checked, not assumed: the engine is ready once its /health answers *and* a one-token completion for the
served model came back through the same client; losing health (or a refused connection on a request) makes it
not ready until both hold again. Nothing here imports torch: a gateway in front of vLLM needs no model in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any
from urllib.parse import urlsplit

from deepseek_server.engine.capabilities import VLLM, EngineCapabilities
from deepseek_server.engine.engine_http import (
    EngineConnectionError,
    EngineConnectTimeout,
    EngineHTTPClient,
    EngineResponse,
    EngineTimeout,
)
from deepseek_server.errors import APIError

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
# how vLLM's 400 for a prompt longer than the context begins ("This model's maximum context length is N tokens...")
CONTEXT_EXCEEDED = "maximum context length is"
WAITING_METRIC = b"vllm:num_requests_waiting"
WARM_PROMPT = "Hello"
# A health check that times out while the engine is ready (no answer in time, or its connection not made within the
# connect timeout) is taken for a busy engine (vLLM answers /health on the event loop that also tokenizes and streams
# every request) until this many in a row have; then the engine is not ready. A refused or dropped connection, or an
# unhealthy answer, is taken at once. A request whose connection was not made in time gets 503 and has the health
# checked at once, which decides.
PROBE_TIMEOUTS_BEFORE_NOT_READY = 3
# Below the engine's own idle keep-alive (uvicorn's default, which vLLM keeps, is 5 s), so a pooled connection is
# never reused at the moment the engine closes it.
KEEPALIVE_EXPIRY_S = 4.0
# How long a scrape of the gateway's /metrics waits for the engine's queue depth, in all (below the autoscaler's
# 3 s per pod).
QUEUE_DEPTH_WAIT_S = 2.0


def engine_unavailable(reason: str) -> APIError:
    return APIError(503, f"The inference engine is not available ({reason}); retry shortly.", type="server_error",
                    code="engine_unavailable", headers={"retry-after": RETRY_AFTER_S})


def engine_timeout(read_timeout_s: float) -> APIError:
    return APIError(504, f"The inference engine did not answer within {read_timeout_s:g} s.", type="server_error",
                    code="engine_timeout")


def engine_error(status: int, content: bytes) -> APIError:
    """The engine's error answer in OpenAI's shape: 4xx keep their status, 5xx become 502 (503 stays 503)."""
    message, param, code = content.decode(errors="replace")[:2000] or f"HTTP {status}", None, None
    try:
        document = json.loads(content)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error") if isinstance(document.get("error"), dict) else document
        message = str(error.get("message") or message)
        param = error.get("param") if isinstance(error.get("param"), str) else None
        code = error.get("code") if isinstance(error.get("code"), str) else None
    if 400 <= status < 500:
        if code is None and status == 400 and CONTEXT_EXCEEDED in message:
            code = "context_length_exceeded"  # OpenAI's code for it (and the builtin engine's); vLLM sends none
        return APIError(status, message, param=param, code=code)
    if status == 503:
        return APIError(503, f"The inference engine is overloaded or starting: {message}", type="server_error",
                        code="engine_unavailable", headers={"retry-after": RETRY_AFTER_S})
    return APIError(502, f"The inference engine failed: {message}", type="server_error", code="engine_error")


def waiting_requests(exposition: bytes) -> int:
    """The sum of vLLM's `vllm:num_requests_waiting` samples in a Prometheus text exposition."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(WAITING_METRIC) and line[len(WAITING_METRIC):len(WAITING_METRIC) + 1] in (b"{", b" "):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(b" ", 1)[1])
    return int(total)


class OpenAIUpstreamEngine:
    """Relays OpenAI requests to an engine server; the gateway around it is the same as for the builtin engine."""

    capabilities: EngineCapabilities = VLLM

    def __init__(self, base_url: str, model_name: str, *, max_new_tokens: int, connect_timeout_s: float = 1.0,
                 read_timeout_s: float = 600.0, probe_interval_s: float = 1.0,
                 capabilities: EngineCapabilities = VLLM) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.max_model_len = 0  # learned from the engine's /v1/models
        self.sampling_defaults: dict[str, float] = {}  # vLLM applies the model's own to what it is relayed
        self.capabilities = capabilities
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.probe_interval_s = probe_interval_s
        self.not_ready_reason: str | None = "the engine has not been checked yet"
        # the engine's `system_fingerprint` (JSON-encoded), learned from the test completion; see relay.py
        self.system_fingerprint: bytes | None = None
        # requests the engine holds but does not run yet (vLLM's `vllm:num_requests_waiting`), read on each
        # scrape of the gateway's /metrics (`refresh_queue_depth`); NaN while the engine does not say
        self.queue_depth: float = 0
        self._ready = False
        self._probe_timeouts = 0  # health checks in a row that timed out
        self._client: EngineHTTPClient | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._recheck = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def client(self) -> EngineHTTPClient:
        if self._client is None:
            raise engine_unavailable("the gateway is not started")
        return self._client

    async def start(self) -> None:
        if self._client is None:
            address = urlsplit(self.base_url)
            if address.scheme != "http" or not address.hostname:
                raise ValueError(f"the engine URL must be http://HOST:PORT, not {self.base_url!r}")
            self._client = EngineHTTPClient(address.hostname, address.port or 80,
                                            connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s,
                                            keepalive_expiry=KEEPALIVE_EXPIRY_S)
        self._recheck = asyncio.Event()
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch(), name="engine-readiness")

    async def stop(self) -> None:
        self._ready = False
        self.not_ready_reason = "the gateway is stopping"
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def lost(self, reason: str) -> None:
        """A request could not reach the engine: stop admitting requests and re-check it now."""
        if self._ready:
            log.warning("inference engine at %s lost: %s", self.base_url, reason)
        self._ready = False
        self.not_ready_reason = reason
        self._recheck.set()

    def slow_to_connect(self, reason: str) -> None:
        """A request's connection was not made in time: keep admitting, and have the health check decide now."""
        log.warning("inference engine at %s: a request could not connect in time (%s); checking its health",
                    self.base_url, reason)
        self._recheck.set()

    async def _watch(self) -> None:
        while True:
            try:
                await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a probe must never end the monitor
                self._mark(False, f"readiness check failed: {type(exc).__name__}: {exc}")
            self._recheck.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns a re-check asked for together with the stop's
            # cancellation and drops the cancellation, and the stop would wait for this loop forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.probe_interval_s):
                    await self._recheck.wait()

    def _mark(self, ready: bool, reason: str | None) -> None:
        if ready and not self._ready:
            log.info("inference engine at %s ready (model %s, max_model_len %d)", self.base_url, self.model_name,
                     self.max_model_len)
        elif not ready and (self._ready or reason != self.not_ready_reason):
            log.warning("inference engine at %s not ready: %s", self.base_url, reason)
        self._ready = ready
        self.not_ready_reason = reason

    async def _fetch(self, method: str, path: str, body: bytes = b"", *, timeout: float) -> EngineResponse:
        """A whole answer (status, headers, body) for the gateway's own calls: probes, warm-up, metrics."""
        response = await self.client.request(method, path, body, timeout=timeout)
        try:
            async with asyncio.timeout(timeout):
                await response.aread()
        except EngineTimeout:
            raise
        except TimeoutError as exc:
            # headers in, then a stall (a hung engine): the same engine timeout as no headers, for every caller
            message = f"the engine's answer to {method} {path} did not arrive within {timeout:g} s"
            raise EngineTimeout(message) from exc
        finally:
            await response.aclose()
        return response

    async def _probe(self) -> None:
        try:
            health = await self._fetch("GET", "/health", timeout=self.connect_timeout_s + 2.0)
        except (TimeoutError, EngineConnectTimeout) as exc:
            # no headers (EngineTimeout) or body in time, or no connection in time
            self._probe_timeouts += 1
            if self._ready and self._probe_timeouts < PROBE_TIMEOUTS_BEFORE_NOT_READY:
                log.warning("inference engine at %s did not answer its health check in time (%d in a row); still "
                            "serving it", self.base_url, self._probe_timeouts)
                return
            self._mark(False, f"engine unreachable: {str(exc) or 'no answer in time'} "
                              f"({self._probe_timeouts} health check(s) in a row timed out)")
            return
        except EngineConnectionError as exc:
            self._mark(False, f"engine unreachable: {exc}")  # its address is in the log, not in answers
            return
        self._probe_timeouts = 0
        if health.status_code != 200:
            self._mark(False, f"engine health check answered {health.status_code}")
            return
        if self._ready:
            return
        await self._warm()

    async def _warm(self) -> None:
        """Ready only after the served model is listed and answered a one-token completion."""
        models = await self._fetch("GET", "/v1/models", timeout=self.connect_timeout_s + 5.0)
        if models.status_code != 200:
            self._mark(False, f"engine /v1/models answered {models.status_code}")
            return
        cards = {card.get("id"): card for card in models.json().get("data", [])}
        if self.model_name not in cards:
            self._mark(False, f"the engine serves {sorted(cards)}, not '{self.model_name}'; --model-name must "
                              "equal the engine's served model name")
            return
        self.max_model_len = int(cards[self.model_name].get("max_model_len") or 0)
        test = {"model": self.model_name, "prompt": WARM_PROMPT, "max_tokens": 1, "temperature": 0}
        answer = await self._fetch("POST", "/v1/completions", json.dumps(test).encode(), timeout=60.0)
        if answer.status_code != 200 or not answer.json().get("choices"):
            self._mark(False, f"the engine's test completion answered {answer.status_code}: {answer.text[:200]}")
            return
        fingerprint = answer.json().get("system_fingerprint")
        self.system_fingerprint = json.dumps(fingerprint).encode() if isinstance(fingerprint, str) else None
        self._mark(True, None)

    async def _send(self, path: str, content: bytes) -> EngineResponse:
        """POST a relayed call: unreachable -> 503 (and re-check readiness), too slow -> 504."""
        try:
            return await self.client.request("POST", path, content)
        except EngineConnectTimeout as exc:
            self.slow_to_connect(str(exc))
            raise engine_unavailable(str(exc)) from exc
        except EngineConnectionError as exc:
            self.lost(str(exc))  # the log names the engine's address; clients are not told it
            raise engine_unavailable(str(exc)) from exc
        except EngineTimeout as exc:
            raise engine_timeout(self.read_timeout_s) from exc

    async def post(self, path: str, content: bytes) -> EngineResponse:
        """A non-streamed call, its body read; the caller maps a non-200 status with `engine_error`."""
        response = await self._send(path, content)
        try:
            await response.aread()
        except EngineConnectionError as exc:
            self.lost(str(exc))  # the log names the engine's address; clients are not told it
            raise engine_unavailable(str(exc)) from exc
        except EngineTimeout as exc:
            raise engine_timeout(self.read_timeout_s) from exc
        finally:
            await response.aclose()  # cancelled (client gone): drops the connection, and the engine aborts
        return response

    async def open_stream(self, path: str, content: bytes) -> EngineResponse:
        """Send a streamed call and return once the engine's status and headers are in (body not yet read).

        The caller must `aclose()` the response; closing it before the end drops the connection, which is how
        the engine learns that the client left and aborts the request.
        """
        response = await self._send(path, content)
        if response.status_code != 200:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            raise engine_error(response.status_code, content)
        return response

    async def scrape_metrics(self) -> tuple[bytes, str]:
        """The engine's own Prometheus exposition (body, content type)."""
        try:
            response = await self._fetch("GET", "/metrics", timeout=self.connect_timeout_s + 5.0)
        except (EngineConnectionError, EngineTimeout) as exc:
            raise engine_unavailable(f"metrics: {exc}") from exc
        if response.status_code != 200:
            raise engine_error(response.status_code, response.content)
        return response.content, response.headers.get("content-type", "text/plain; version=0.0.4")

    async def refresh_queue_depth(self) -> None:
        """Read how many requests wait in the engine's queue from its metrics, within `QUEUE_DEPTH_WAIT_S`: a scrape
        of the gateway's /metrics (Prometheus, the autoscaler with its 3 s timeout) does not wait longer for a busy
        engine. When the engine does not answer in time the depth is unknown: NaN, not the last value, which a
        reader would take for the present (the autoscaler counts such a pod as one that did not report)."""
        try:
            async with asyncio.timeout(QUEUE_DEPTH_WAIT_S):  # connecting, the headers and the body together
                body, _ = await self.scrape_metrics()
        except (APIError, TimeoutError):
            self.queue_depth = math.nan
            return
        self.queue_depth = waiting_requests(body)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        raise NotImplementedError("the engine tokenizes relayed requests itself")

    def encode_text(self, text: str) -> list[int]:
        raise NotImplementedError("the engine tokenizes relayed requests itself")

    def submit(self, request: Any) -> Any:
        raise NotImplementedError("requests are relayed to the engine as OpenAI calls, see deepseek_server.relay")
