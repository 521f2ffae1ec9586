"""Prometheus metrics of one app instance, in its own registry (labels bounded: route template, status)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# `*_created` series double the output and no dashboard uses them
disable_created_metrics()

# a stream that fails after its 200 is counted under the status of its error (`request_recording`)
REQUESTS_HELP = "API requests by route and status code (a stream that failed after its 200: its error's status)"
ERRORS_HELP = "API requests that failed: status >= 400, or a stream that failed after its 200"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RequestStats:
    """`deepseek_api_requests_total`, `deepseek_api_errors_total` (by route and status) and
    `deepseek_api_request_duration_seconds` (by route), counted in plain numbers on the event loop and turned into
    samples when scraped. Updating prometheus_client's labelled children (a lock per value, a Python loop over the
    buckets) cost several times more per request."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = (*sorted(float(b) for b in buckets), math.inf)
        self._le = [floatToGoString(bound) for bound in self._bounds]
        # route -> (count by status, [latency sum, count per bucket...]): one lookup by route, none by a tuple key
        self._routes: dict[str, tuple[dict[int, int], list[float]]] = {}
        self._order: list[tuple[str, int]] = []  # (route, status) pairs as first seen: the samples' order

    def observe(self, route: str, status: int, elapsed: float) -> None:
        """Count one answered request of `route` with `status` that took `elapsed` seconds."""
        stats = self._routes.get(route)
        if stats is None:
            stats = self._routes[route] = ({}, [0.0] * (len(self._bounds) + 1))
        counts, latency = stats
        count = counts.get(status)
        if count is None:
            self._order.append((route, status))
            count = 0
        counts[status] = count + 1
        latency[0] += elapsed
        latency[1 + bisect_left(self._bounds, elapsed)] += 1  # the first bucket whose bound is >= elapsed

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily("deepseek_api_requests", REQUESTS_HELP, labels=["route", "status"])
        errors = CounterMetricFamily("deepseek_api_errors", ERRORS_HELP, labels=["route", "status"])
        latency = HistogramMetricFamily("deepseek_api_request_duration_seconds", "Time to the last byte of a response",
                                        labels=["route"])
        order = list(self._order)  # before the routes: each pair's route is in them
        routes = dict(self._routes)
        for route, status in order:
            count = routes[route][0][status]
            requests.add_metric([route, str(status)], count)
            if status >= 400:
                errors.add_metric([route, str(status)], count)
        for route, (_, counts) in routes.items():
            total, *per_bucket = list(counts)
            cumulative, buckets = 0.0, []
            for le, count in zip(self._le, per_bucket, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            latency.add_metric([route], buckets, total)
        return [requests, errors, latency]


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.api_requests = RequestStats(LATENCY_BUCKETS)
        r.register(self.api_requests)
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
