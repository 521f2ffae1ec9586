"""Prometheus metrics of one app instance, in its own registry (labels bounded: route template, status)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# `*_created` series double the output and no dashboard uses them
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deepseek_api_requests", "API requests by route and status code",
                                ["route", "status"], registry=r)
        self.errors = Counter("deepseek_api_errors", "API requests answered with status >= 400",
                              ["route", "status"], registry=r)
        self.latency = Histogram("deepseek_api_request_duration_seconds", "Time to the last byte of a response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("deepseek_time_to_first_token_seconds", "Time from request to first generated text",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("deepseek_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("deepseek_prompt_tokens", "Prompt tokens processed", registry=r)
        self.batch_size = Histogram("deepseek_batch_size", "Sequences decoded together, observed per decode step",
                                    buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("deepseek_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.ratelimit_rejections = Counter("deepseek_ratelimit_rejections", "Requests refused by a rate limit",
                                            ["limit"], registry=r)
        self.ratelimit_backend_errors = Counter("deepseek_ratelimit_backend_errors",
                                                "Rate-limit checks that fell back to memory (Redis unreachable)",
                                                registry=r)
        self.cache_hits = Counter("deepseek_cache_hits", "Responses served from the response cache", registry=r)
        self.cache_misses = Counter("deepseek_cache_misses", "Cacheable requests not found in the cache",
                                    registry=r)
        self.auth_reloads = Counter("deepseek_auth_reloads", "Auth states applied (JWKS, revocations, limits)",
                                    registry=r)
        self.auth_generation = Gauge("deepseek_auth_generation", "generation of the applied auth config",
                                     registry=r)
