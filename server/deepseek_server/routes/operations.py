"""Probes and metrics: /health (alive), /ready (model loaded and warmed, auth loaded), /metrics, /metrics/engine."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deepseek_server.engine.capabilities import capabilities_of
from deepseek_server.errors import APIError

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    services = request.app.state.services
    model_ready = services.engine is not None and services.engine.ready
    auth_ready = services.authenticator.loaded
    body = {"status": "ready" if model_ready and auth_ready and not services.shutting_down else "not ready",
            "model": model_ready, "auth": auth_ready, "shutting_down": services.shutting_down}
    if services.authenticator.disabled:
        body["warning"] = "authentication is DISABLED on this server"
    if services.load_error:
        body["error"] = services.load_error
    elif not model_ready and getattr(services.engine, "not_ready_reason", None):
        body["error"] = services.engine.not_ready_reason  # an engine in another process: why it is not ready
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services = request.app.state.services
    if services.engine is not None:
        if capabilities_of(services.engine).own_metrics:  # an engine in another process: ask it
            await services.engine.refresh_queue_depth()
        services.metrics.queue_depth.set(services.engine.queue_depth)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/engine")
async def engine_metrics(request: Request) -> Response:
    """The engine's own Prometheus metrics (vLLM's), through the gateway's port: the engine's port stays private."""
    engine = request.app.state.services.engine
    if engine is None or not capabilities_of(engine).own_metrics:
        raise APIError(404, "This server's engine has no metrics of its own; see /metrics.", code="not_found")
    body, content_type = await engine.scrape_metrics()
    return Response(body, media_type=content_type)
