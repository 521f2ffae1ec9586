"""The objects one app instance wires together, built from settings (each may be injected by tests)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deepseek_server.audit import AuditLog, MemoryHistory, RedisHistory
from deepseek_server.auth.guard import Authenticator
from deepseek_server.cache import ResponseCache
from deepseek_server.engine.base import Engine
from deepseek_server.limits.limiter import RateLimiter
from deepseek_server.limits.redis_store import RedisLimitStore
from deepseek_server.metrics import ServerMetrics
from deepseek_server.redaction import Redactor
from deepseek_server.request_keys import RequestKeys
from deepseek_server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: ServerSettings
    metrics: ServerMetrics
    authenticator: Authenticator
    limiter: RateLimiter
    cache: ResponseCache | None
    audit: AuditLog
    request_keys: RequestKeys
    redactor: Redactor
    engine: Engine | None = None
    redis: Any = None
    shutting_down: bool = False
    load_error: str | None = None
    # called once loading the model failed for good (`serve` stops the process then, so that it exits non-zero)
    on_load_failure: Callable[[], None] | None = None
    background: list[Any] = field(default_factory=list)
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def history(self) -> AuditLog:
        """Reads of the history go through the audit log, which first writes what it still has queued."""
        return self.audit


def redis_client(settings: ServerSettings) -> Any:
    """An asyncio Redis client with short timeouts, so an outage degrades quickly instead of hanging requests."""
    if settings.redis_url is None:
        return None
    import redis.asyncio as aioredis

    return aioredis.from_url(settings.redis_url, socket_connect_timeout=settings.redis_timeout_s,
                             socket_timeout=settings.redis_timeout_s, retry_on_timeout=False)


def build_services(settings: ServerSettings, engine: Engine | None = None) -> Services:
    metrics = ServerMetrics()
    redis = redis_client(settings)
    authenticator = Authenticator(disabled=settings.auth == "disabled")
    limiter = RateLimiter(RedisLimitStore(redis) if redis is not None else None,
                          on_backend_error=metrics.ratelimit_backend_errors.inc)
    record_key = settings.record_key.get_secret_value() if settings.record_key is not None else None
    request_keys = RequestKeys.from_settings(record_key, settings.deployment,
                                             settings.model_revision or settings.served_model_name())
    cache = (ResponseCache(settings.cache_ttl, request_keys, settings.cache_max_entries, redis)
             if settings.cache_enabled else None)
    history = RedisHistory(redis, settings.history_size) if redis is not None else MemoryHistory(settings.history_size)
    audit = AuditLog(history, settings.audit_log)
    return Services(settings=settings, metrics=metrics, authenticator=authenticator, limiter=limiter, cache=cache,
                    audit=audit, request_keys=request_keys, redactor=Redactor.from_setting(settings.redact),
                    engine=engine, redis=redis)
