"""Verification of a new color with real inference, and the live error rate after the switch.

Requests go straight to pod IPs (from the preview Service's EndpointSlices), each carrying a short-lived token the
operator mints for itself (docs/auth-contract.md: `sub: system:deepseek-operator`, `uid` = the deployment's UID,
`scope: [model:predict]`, `env: prod`, at most 10 minutes). The token never leaves this module.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from .key_material import new_token_id
from .names import SERVER_PORT, pod_url
from .signing_keys import SigningKey
from .tokens import TokenGrant, sign_token

log = logging.getLogger(__name__)

OPERATOR_SUBJECT = "system:deepseek-operator"
TOKEN_LIFETIME_SECONDS = 300  # the contract allows at most 10 minutes
SMOKE_MAX_TOKENS = 8
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class AnalysisSettings:
    """`spec.rollout.analysis`."""

    smoke_prompt: str = "Say hello in one short sentence."
    requests: int = 5
    max_error_rate: float = 0.05
    max_latency_ms: float = 30000.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> AnalysisSettings:
        analysis = (spec.get("rollout") or {}).get("analysis") or {}
        return cls(
            smoke_prompt=str(analysis.get("smokePrompt", cls.smoke_prompt)),
            requests=int(analysis.get("requests", cls.requests)),
            max_error_rate=float(analysis.get("maxErrorRate", cls.max_error_rate)),
            max_latency_ms=float(analysis.get("maxLatencyMs", cls.max_latency_ms)),
        )


@dataclass(frozen=True)
class Endpoint:
    """One ready pod behind the preview Service."""

    pod: str
    ip: str


@dataclass(frozen=True)
class Outcome:
    """One verification request."""

    pod: str
    ok: bool
    latency_ms: float
    detail: str


def ready_endpoints(slices: Iterable[Mapping[str, Any]]) -> list[Endpoint]:
    """Ready endpoints of a Service's EndpointSlices (pods still loading or terminating are not ready)."""
    found: dict[str, Endpoint] = {}
    for item in slices:
        for endpoint in item.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            target = endpoint.get("targetRef") or {}
            addresses = endpoint.get("addresses") or []
            if target.get("kind") == "Pod" and addresses:
                found[target["name"]] = Endpoint(target["name"], addresses[0])
    return sorted(found.values(), key=lambda e: e.pod)


def verification_grant(*, namespace: str, deployment: str, deployment_uid: str, token_id: str,
                       now: int) -> TokenGrant:
    """The claims of the operator's own verification token (pure)."""
    return TokenGrant(
        issuer=f"deepseek-operator/{namespace}/{deployment}",
        audience=f"{namespace}/{deployment}",
        subject=OPERATOR_SUBJECT,
        scopes=("model:predict",),
        environment="prod",
        apikey_uid=deployment_uid,
        token_id=token_id,
        issued_at=now,
        expires_at=now + TOKEN_LIFETIME_SECONDS,
    )


def judge(outcomes: Sequence[Outcome], settings: AnalysisSettings, expected_pods: Sequence[str]) -> dict[str, Any]:
    """The analysis status block: error rate and p95 latency against the thresholds; every pod must answer once."""
    requests = len(outcomes)
    errors = sum(1 for item in outcomes if not item.ok)
    latencies = sorted(item.latency_ms for item in outcomes if item.ok)

    def percentile(q: float) -> float:
        if not latencies:
            return 0.0
        return round(latencies[min(len(latencies) - 1, math.ceil(q * len(latencies)) - 1)], 1)

    rate = errors / requests if requests else 1.0
    p50, p95 = percentile(0.5), percentile(0.95)
    silent = sorted(set(expected_pods) - {item.pod for item in outcomes if item.ok})
    problems: list[str] = []
    if requests == 0:
        problems.append("no request could be sent")
    if rate > settings.max_error_rate:
        first = next((item for item in outcomes if not item.ok), None)
        problems.append(f"error rate {rate:.0%} ({errors}/{requests}) above {settings.max_error_rate:.0%}"
                        + (f"; e.g. {first.pod}: {first.detail}" if first else ""))
    if p95 > settings.max_latency_ms:
        problems.append(f"p95 latency {p95:.0f} ms above {settings.max_latency_ms:.0f} ms")
    if silent:
        problems.append(f"no successful answer from pod(s) {', '.join(silent)}")
    passed = not problems
    message = (f"{requests - errors}/{requests} requests answered on {len(expected_pods)} pod(s), "
               f"p50 {p50:.0f} ms, p95 {p95:.0f} ms") if passed else "; ".join(problems)
    return {"requests": requests, "errors": errors, "errorRate": round(rate, 4), "p50LatencyMs": p50,
            "p95LatencyMs": p95, "passed": passed, "message": message[:4000]}


def completion_problem(body: bytes) -> str | None:
    """What is wrong with an unstreamed chat completion answered 200, or None when it generated something."""
    try:
        payload = json.loads(body)
        choice = payload["choices"][0]
        content = choice["message"].get("content") or ""
        generated = int((payload.get("usage") or {}).get("completion_tokens", 0))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return f"unreadable completion: {exc!r}"
    if not content and generated == 0:
        return "empty completion"
    return None


def stream_problem(text: str) -> str | None:
    """What is wrong with a streamed chat completion answered 200, or None when it generated something and finished:
    an error event after the 200 (how a stream fails once begun), events that do not parse, or an end without a
    `finish_reason`."""
    content, generated, finished = "", 0, False
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            event = json.loads(data)
            if isinstance(event, dict) and event.get("error") is not None:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                return f"error event after HTTP 200: {str(message)[:200]}"
            for choice in event.get("choices") or []:
                content += (choice.get("delta") or {}).get("content") or ""
                finished = finished or choice.get("finish_reason") is not None
            generated = max(generated, int((event.get("usage") or {}).get("completion_tokens") or 0))
        except (ValueError, TypeError, AttributeError) as exc:
            return f"unreadable stream event: {exc!r}"
    if not finished:
        return "the stream ended without a finish_reason"
    if not content and generated == 0:
        return "empty completion"
    return None


def parse_request_counts(text: str) -> tuple[int, int]:
    """(requests, server errors) of the API routes (`/v1/...`, not probes or /metrics) from a server's /metrics:
    `deepseek_api_requests_total` by `status`; 5xx are the server's fault (4xx are the callers': bad keys, limits)."""
    requests = errors = 0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group("name") != "deepseek_api_requests_total":
            continue
        labels = dict(_LABEL.findall(match.group("labels") or ""))
        if not labels.get("route", "").startswith("/v1/"):
            continue
        value = int(float(match.group("value")))
        requests += value
        if labels.get("status", "").startswith("5"):
            errors += value
    return requests, errors


def request_plan(endpoints: Sequence[Endpoint], requests: int) -> list[tuple[Endpoint, bool]]:
    """(pod, streamed) for each verification request: `requests` of them (at least one per pod), round-robin over
    the pods, and each pod's own requests alternating unstreamed and streamed, starting with one of each kind on
    alternate pods, so that any pod sent two or more gets both: a stream fails after its 200, through code an
    unstreamed answer never runs."""
    if not endpoints:
        return []
    pods = len(endpoints)
    return [(endpoints[i % pods], (i % pods + i // pods) % 2 == 1) for i in range(max(requests, pods))]


class Verifier:
    """Sends the requests; thread-safe, one HTTP client for all deployments."""

    def __init__(self, *, clock: Callable[[], float] = time.time, timeout: float = 60.0,
                 port: int = SERVER_PORT) -> None:
        self._clock = clock
        self._port = port
        self._http = httpx.Client(timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _one(self, endpoint: Endpoint, token: str, model: str, settings: AnalysisSettings,
             stream: bool = False) -> Outcome:
        body: dict[str, Any] = {
            "model": model, "messages": [{"role": "user", "content": settings.smoke_prompt}],
            # Sampled, not greedy: a deterministic request could be answered from a shared response cache filled by
            # the old color, and then nothing of the new one would be tested.
            "max_tokens": SMOKE_MAX_TOKENS, "temperature": 0.8}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        started = time.monotonic()
        try:
            response = self._http.post(pod_url(endpoint.ip, self._port, "/v1/chat/completions"), json=body,
                                       headers={"Authorization": f"Bearer {token}"},
                                       timeout=max(5.0, settings.max_latency_ms / 1000.0 + 5.0))
        except httpx.HTTPError as exc:
            return Outcome(endpoint.pod, False, (time.monotonic() - started) * 1000, f"{type(exc).__name__}: {exc}")
        latency = (time.monotonic() - started) * 1000
        if response.status_code != 200:
            return Outcome(endpoint.pod, False, latency, f"HTTP {response.status_code}: {response.text[:200]}")
        problem = stream_problem(response.text) if stream else completion_problem(response.content)
        return Outcome(endpoint.pod, problem is None, latency, problem or "ok")

    def verify(self, endpoints: Sequence[Endpoint], *, signing_key: SigningKey, namespace: str, deployment: str,
               deployment_uid: str, model: str, settings: AnalysisSettings) -> dict[str, Any]:
        """Send `settings.requests` requests (at least one per pod), round-robin over the pods, half of them
        streamed (see `request_plan`); the judged block."""
        now = int(self._clock())
        token = sign_token(verification_grant(namespace=namespace, deployment=deployment,
                                              deployment_uid=deployment_uid, token_id=new_token_id(), now=now),
                           signing_key)
        plan = request_plan(endpoints, settings.requests)
        with ThreadPoolExecutor(max_workers=max(1, len(endpoints))) as pool:
            # one worker per pod: each pod sees its requests one after another, as a light real client would
            per_pod: dict[str, list[tuple[Endpoint, bool]]] = {}
            for endpoint, stream in plan:
                per_pod.setdefault(endpoint.pod, []).append((endpoint, stream))
            futures = [pool.submit(lambda items=items: [self._one(e, token, model, settings, stream)
                                                        for e, stream in items])
                       for items in per_pod.values()]
            outcomes = [outcome for future in futures for outcome in future.result()]
        return judge(outcomes, settings, [e.pod for e in endpoints])

    def live_counts(self, pod_ips: Iterable[str]) -> tuple[int, int] | None:
        """Summed (requests, 5xx) of the pods' /metrics; None when no pod answered."""
        total = errors = 0
        answered = False
        for ip in pod_ips:
            try:
                response = self._http.get(pod_url(ip, self._port, "/metrics"), timeout=5.0)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.info("metrics of %s unavailable: %s", ip, exc)
                continue
            answered = True
            requests, failures = parse_request_counts(response.text)
            total += requests
            errors += failures
        return (total, errors) if answered else None
