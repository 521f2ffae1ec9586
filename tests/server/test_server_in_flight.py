"""`deepseek_requests_in_flight`, the load the operator's autoscaler reads: API requests begun and not yet answered
to their last byte (a stream counts until its end), back to zero when they end; probes and /metrics do not count.

The recording middleware runs around a small ASGI app whose /v1 route sends a first chunk and then waits, so the
moment of the reading is certain (a tiny model answers faster than a test can look)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from deepseek_server.metrics import ServerMetrics
from deepseek_server.redaction import Redactor
from deepseek_server.request_recording import IN_FLIGHT_METRIC, RequestRecordingMiddleware


class HeldStreams:
    """`/v1/...` answers a first chunk, then the rest once released; anything else answers at once."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"].startswith("/v1/"):
            await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
            self.started += 1
            await self.release.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def test_requests_count_in_flight_until_their_last_byte() -> None:
    metrics = ServerMetrics()
    inner = HeldStreams()
    app = RequestRecordingMiddleware(inner, metrics=metrics, audit=None,
                                     redactor=Redactor(frozenset()))

    def in_flight() -> float | None:
        return metrics.registry.get_sample_value(IN_FLIGHT_METRIC)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
        assert in_flight() == 0
        streams = [asyncio.create_task(client.post("/v1/chat/completions", json={})) for _ in range(3)]
        for _ in range(200):
            if inner.started == 3:
                break
            await asyncio.sleep(0.01)
        assert inner.started == 3
        assert (await client.get("/health")).status_code == 200  # not an API request: not counted
        assert in_flight() == 3
        inner.release.set()
        answers = await asyncio.gather(*streams)
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert in_flight() == 0
