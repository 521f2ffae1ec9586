"""The app factory: `create_app(settings, engine=...)` wires services, routers and middleware."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from deepseek_server import __version__
from deepseek_server.auth.configmap_source import ConfigMapAuthSource
from deepseek_server.auth.directory_source import DirectoryAuthSource
from deepseek_server.auth.documents import AuthState
from deepseek_server.body_limit import BodyLimitMiddleware
from deepseek_server.engine.base import Engine
from deepseek_server.engine.openai_upstream import OpenAIUpstreamEngine
from deepseek_server.errors import install_error_handlers
from deepseek_server.request_recording import RequestRecordingMiddleware
from deepseek_server.routes import completions, history, operations
from deepseek_server.services import Services, build_services
from deepseek_server.settings import ServerSettings

log = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Move everything alive now (modules, the app, loaded weights' Python objects) out of the garbage collector's
    reach: they live as long as the process, and a full collection would otherwise walk them all again every
    thousand-odd requests (on the no-op engine that walk was a tenth of each request's CPU; with torch and
    transformers loaded the heap is several times larger). Objects created later are collected as usual. Once per
    process: a server process holds one app.

    Young collections then run after `YOUNG_COLLECTION_THRESHOLD` new container objects instead of Python's 700. A
    request has hundreds of objects alive at once while it is answered, all freed by their reference counts when it
    ends; with the default, collections that found little to free took about 40 us of a no-op request's ~550 us of
    CPU (one young collection every ten requests and the older ones they lead to). Garbage in reference cycles is
    still collected, after at most that many new objects."""
    global _startup_frozen
    if _startup_frozen:
        return
    _startup_frozen = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


YOUNG_COLLECTION_THRESHOLD = 50_000
_startup_frozen = False

AUTH_DISABLED_WARNING = (
    "!!! AUTHENTICATION IS DISABLED (--auth disabled): anyone who can reach this port can use the model, "
    "without rate limits. Never run this way in a shared cluster. !!!"
)


def _auth_source(services: Services) -> DirectoryAuthSource | ConfigMapAuthSource | None:
    settings = services.settings

    def apply(state: AuthState) -> None:
        services.authenticator.set_state(state)
        services.metrics.auth_reloads.inc()
        services.metrics.auth_generation.set(state.generation)

    if settings.auth == "disabled":
        return None
    if settings.auth_dir is not None:
        return DirectoryAuthSource(settings.auth_dir, apply)
    assert settings.auth_configmap is not None
    return ConfigMapAuthSource(settings.auth_configmap, apply)


async def _load_engine(services: Services) -> None:
    """Load the model from settings off the event loop, so /health answers while weights load."""
    settings = services.settings
    try:
        try:
            from deepseek_server.engine.batched import BatchedEngine
            from deepseek_server.engine.loading import load_model
        except ImportError as exc:
            raise RuntimeError(f"--engine builtin needs torch and transformers ({exc}): install "
                               "deepseek-server[builtin], or use --engine vllm") from exc
        if settings.model is None:
            raise ValueError("no model given: pass --model PATH (or DEEPSEEK_MODEL)")
        loaded = await asyncio.to_thread(load_model, settings.model, settings.precision, settings.device,
                                         settings.torch_threads)
        engine = BatchedEngine(
            loaded,
            model_name=settings.served_model_name(),
            max_batch_size=settings.max_batch_size,
            max_model_len=settings.max_model_len,
            max_new_tokens=settings.max_new_tokens,
            batch_wait_s=settings.batch_wait_ms / 1000,
            on_batch=services.metrics.batch_size.observe,
            kv_cache_tokens=settings.kv_cache_tokens,
            max_prefill_tokens=settings.max_prefill_tokens,
            admission_wait_s=settings.admission_wait_s,
        )
        await engine.start()
        services.engine = engine
        freeze_startup_objects()
        log.info("model %s ready", engine.model_name)
    except Exception as exc:
        services.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("loading the model failed")
        if services.on_load_failure is not None:
            services.on_load_failure()


def upstream_engine(settings: ServerSettings) -> OpenAIUpstreamEngine:
    """The engine in front of which this process is only the gateway (vLLM's OpenAI server on localhost)."""
    return OpenAIUpstreamEngine(settings.engine_url, settings.served_model_name(),
                                max_new_tokens=settings.max_new_tokens,
                                connect_timeout_s=settings.engine_connect_timeout_s,
                                read_timeout_s=settings.engine_read_timeout_s)


def create_app(settings: ServerSettings, engine: Engine | None = None, *, record_requests: bool = True) -> FastAPI:
    """Build the server app. With `engine=None` the model in `settings.model` is loaded at start-up.

    `record_requests=False` leaves out metrics and audit recording (only for measuring their cost).
    """
    if engine is None and settings.engine == "vllm":
        engine = upstream_engine(settings)  # type: ignore[assignment]  # relayed, see deepseek_server.relay
    services = build_services(settings, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        services.shutting_down = False
        if settings.auth == "disabled":
            for _i in range(3):
                log.warning(AUTH_DISABLED_WARNING)
        source = _auth_source(services)
        if source is not None:
            source.start()
        loader: asyncio.Task[Any] | None = None
        if services.engine is None:
            loader = asyncio.create_task(_load_engine(services))
        else:
            await services.engine.start()
            freeze_startup_objects()
        try:
            yield
        finally:
            services.shutting_down = True
            if loader is not None and not loader.done():
                loader.cancel()
            if services.engine is not None:
                await services.engine.stop()
            if source is not None:
                source.stop()
            if services.redis is not None:
                await services.redis.aclose()
            await services.audit.aclose()

    # Metrics are Prometheus (/metrics); FastAPI's OpenTelemetry hooks would only look up unconfigured providers on
    # every request.
    app = FastAPI(title="deepseek-server", version=__version__, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.services = services
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(history.router)
    app.include_router(operations.router)
    completions.install_direct_routes(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if record_requests:
        app.add_middleware(RequestRecordingMiddleware, metrics=services.metrics, audit=services.audit,
                           redactor=services.redactor)
    return app
