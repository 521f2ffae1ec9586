"""Autoscaling of a DeepSeekDeployment's active color on the load its servers report, with no metrics pipeline.

Like KubeAI: every interval the operator reads `/metrics` of each ready pod of the active color, sums the load
(`deepseek_requests_in_flight` or `deepseek_queue_depth`), recommends `ceil(total / target)` replicas clamped to
[minReplicas, maxReplicas], and stabilizes it the way the HorizontalPodAutoscaler does: up only to the lowest
recommendation of the whole up-window, down only to the highest of the whole down-window.

The decision is pure (`recommend`, `stabilize`, `decide`); `Autoscaler` gathers pods and metrics and writes
`status.autoscaling`. The count it decides is `status.autoscaling.desiredReplicas`; the rollout scales the active
color to it (`effective_replicas`), so there is one place that scales, and spec is never written (GitOps owns it).
Pending pods are never capacity: load is read from ready pods only, and while pods wait for GPUs the count is not
raised further.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from .durations import parse_duration
from .names import SERVER_PORT, pod_url
from .settings import ENV_PREFIX

log = logging.getLogger(__name__)

# one sample line of the Prometheus text format: name, optional labels, value
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)')
METRICS = {"InFlightRequests": "deepseek_requests_in_flight", "QueueDepth": "deepseek_queue_depth"}
DEFAULT_INTERVAL = 10.0
# Readings further apart than this many intervals, plus two reads' timeouts (a look starts an interval after the
# previous one ended, and reading slow pods takes up to READ_TIMEOUT_S), leave a gap the windows cannot bridge (a
# rollout, pods that did not report): the windows fill again before the next scale.
GAP_INTERVALS = 3
READ_TIMEOUT_S = 3.0
IN_PROGRESS_PHASES = ("Provisioning", "Starting", "Verifying", "AwaitingPromotion", "Promoting", "PostVerifying",
                      "RollingBack")


def autoscale_interval(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between two looks at the load, from `DEEPSEEK_OPERATOR_AUTOSCALE_INTERVAL` (`10s` by default)."""
    environ = os.environ if environ is None else environ
    key = f"{ENV_PREFIX}AUTOSCALE_INTERVAL"
    if key not in environ:
        return DEFAULT_INTERVAL
    try:
        return max(1.0, parse_duration(environ[key]))
    except ValueError as exc:
        raise ValueError(f"{key}={environ[key]!r}: {exc}") from exc


@dataclass(frozen=True)
class AutoscalingSettings:
    """`spec.autoscaling` when enabled."""

    min_replicas: int = 1
    max_replicas: int = 1
    metric: str = "InFlightRequests"
    target: float = 4.0
    scale_up_window: float = 30.0
    scale_down_window: float = 300.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> AutoscalingSettings | None:
        """The settings, or None when autoscaling is off (absent or `enabled: false`)."""
        block = spec.get("autoscaling") or {}
        if not block.get("enabled"):
            return None
        minimum = max(1, int(block.get("minReplicas", 1)))
        return cls(
            min_replicas=minimum,
            max_replicas=max(minimum, int(block.get("maxReplicas", minimum))),
            metric=str(block.get("metric", "InFlightRequests")),
            target=float(block.get("targetPerReplica", 4)),
            scale_up_window=float((block.get("scaleUp") or {}).get("stabilizationWindowSeconds", 30)),
            scale_down_window=float((block.get("scaleDown") or {}).get("stabilizationWindowSeconds", 300)),
        )

    def clamp(self, replicas: int) -> int:
        return min(self.max_replicas, max(self.min_replicas, replicas))


def effective_replicas(spec: Mapping[str, Any], status: Mapping[str, Any]) -> int:
    """Replicas the active color runs: `spec.replicas`, or with autoscaling the autoscaler's decision (starting
    from `spec.replicas`, clamped to the bounds, before its first decision)."""
    settings = AutoscalingSettings.from_spec(spec)
    replicas = int(spec.get("replicas", 1))
    if settings is None:
        return replicas
    desired = (status.get("autoscaling") or {}).get("desiredReplicas")
    return settings.clamp(desired if isinstance(desired, int) else replicas)


@dataclass(frozen=True)
class Load:
    """The load the ready pods of the active color reported."""

    total: float
    pods: int  # ready pods that answered
    ready: int  # ready pods asked

    @property
    def per_replica(self) -> float:
        return self.total / self.pods if self.pods else 0.0

    @property
    def complete(self) -> bool:
        return self.pods == self.ready


@dataclass(frozen=True)
class Sample:
    """One recommendation and when it was made (epoch seconds). A partial one (a ready pod did not report: a busy
    pod's /metrics can time out) is a lower bound: it counts towards scaling up, and is no evidence for scaling down."""

    at: float
    replicas: int
    complete: bool = True


def recommend(total_load: float, settings: AutoscalingSettings) -> int:
    """Replicas for `total_load` at `settings.target` per replica, within the bounds."""
    return settings.clamp(math.ceil(round(total_load / settings.target, 6)))


def window_values(history: Sequence[Sample], now: float, window: float,
                  max_gap: float | None = None) -> list[int] | None:
    """The recommendations in force at some time during the last `window` seconds (history oldest first), or None
    when the history does not cover the whole window: it does not reach back that far yet (just started, or just
    restarted), or, with `max_gap`, two readings in it lie more than `max_gap` seconds apart (a rollout, or a time
    when no pod reported: nothing is known of it, and a reading from before it is not in force through it)."""
    if not history:
        return None
    start = now - window
    before = [sample for sample in history if sample.at <= start]
    inside = [sample for sample in history if sample.at > start]
    if window <= 0:
        return [history[-1].replicas]
    if not before:
        return None
    covering = [before[-1], *inside]
    if max_gap is not None and any(later.at - earlier.at > max_gap
                                   for earlier, later in itertools.pairwise(covering)):
        return None
    return [sample.replicas for sample in covering]


def stabilize(history: Sequence[Sample], current: int, now: float, settings: AutoscalingSettings,
              max_gap: float | None = None) -> int:
    """Up only when every recommendation of the up-window is above `current` (to their minimum); down only to the
    highest recommendation of the down-window, partial ones included (each is a lower bound of what was needed),
    and only when complete readings cover that window; else `current`. `max_gap`: see `window_values`."""
    up = window_values(history, now, settings.scale_up_window, max_gap)
    if up is not None and min(up) > current:
        return min(up)
    evidence = window_values([sample for sample in history if sample.complete], now, settings.scale_down_window)
    seen = window_values(history, now, settings.scale_down_window, max_gap)
    if evidence is not None and seen is not None and max(*evidence, *seen) < current:
        return max(*evidence, *seen)
    return current


def trim_history(history: Sequence[Sample], now: float, settings: AutoscalingSettings) -> list[Sample]:
    """What stabilization still needs: the samples of the longest window and the one in force at its start (and the
    complete one in force then, for the down-window)."""
    start = now - max(settings.scale_up_window, settings.scale_down_window)
    before = [sample for sample in history if sample.at <= start]
    kept = before[-1:]
    if kept and not kept[0].complete:
        kept = [sample for sample in before if sample.complete][-1:] + kept
    return [*kept, *(sample for sample in history if sample.at > start)]


@dataclass(frozen=True)
class ScaleDecision:
    """What the autoscaler decided: the replicas the active color should run and why, in words."""

    desired: int
    recommendation: int | None
    reason: str
    direction: str | None = None  # "up" or "down" when `desired` differs from the count before
    held_for_capacity: bool = False


def decide(settings: AutoscalingSettings, *, current: int, load: Load | None, history: Sequence[Sample], now: float,
           rollout: str | None, pending_for_gpus: int, max_gap: float | None = None) -> ScaleDecision:
    """The next count for the active color (pure). `current` is the count decided before (within the bounds),
    `history` the recommendations so far including this one's (oldest first), `rollout` the phase of a rollout in
    progress, `pending_for_gpus` the pods of the active color the scheduler cannot place for lack of GPUs,
    `max_gap` the longest time between two readings that still counts as watching (see `window_values`)."""
    bounded = settings.clamp(current)
    if bounded != current:
        return ScaleDecision(bounded, None, f"{current} replica(s) is outside [{settings.min_replicas}, "
                                            f"{settings.max_replicas}]: set to {bounded}",
                             "up" if bounded > current else "down")
    if rollout is not None:
        return ScaleDecision(current, None, f"holding at {current} replica(s) while the rollout is {rollout}: the new "
                                            "color starts at this count and the handover is not disturbed")
    if load is None:
        return ScaleDecision(current, None, f"holding at {current} replica(s): no ready pod of the active color "
                                            "reported its load")
    recommendation = history[-1].replicas if history else recommend(load.total, settings)
    seen = (f"{_number(load.total)} {_unit(settings)} on {load.pods} ready pod(s), "
            f"{_number(load.per_replica)} per replica against a target of {_number(settings.target)}")
    target = stabilize(history, current, now, settings, max_gap)
    if target < current and not load.complete:
        return ScaleDecision(current, recommendation, f"holding at {current}: only {load.pods} of {load.ready} ready "
                                                      f"pod(s) reported their load; {seen}")
    if target > current and pending_for_gpus > 0:
        return ScaleDecision(current, recommendation, f"holding at {current}: {pending_for_gpus} pod(s) already wait "
                                                      f"for GPUs, more would only wait too; {seen}",
                             held_for_capacity=True)
    if target > current:
        return ScaleDecision(target, recommendation, f"{seen}: above target for "
                                                     f"{int(settings.scale_up_window)} s", "up")
    if target < current:
        return ScaleDecision(target, recommendation, f"{seen}: at most {target} replica(s) needed over the last "
                                                     f"{int(settings.scale_down_window)} s", "down")
    if recommendation != current:
        window = settings.scale_up_window if recommendation > current else settings.scale_down_window
        return ScaleDecision(current, recommendation, f"{seen}: recommends {recommendation}, waiting out the "
                                                      f"{int(window)} s stabilization window")
    return ScaleDecision(current, recommendation, f"{seen}: {current} replica(s) fit")


def _unit(settings: AutoscalingSettings) -> str:
    return "request(s) in flight" if settings.metric == "InFlightRequests" else "request(s) queued"


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def metric_value(text: str, name: str) -> float | None:
    """The sum of the samples of `name` in a Prometheus text exposition, or None when the server has none."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is not None and match.group("name") == name:
            try:
                value = float(match.group("value"))
            except ValueError:  # not a number: not a reading
                continue
            if not math.isfinite(value):  # NaN: the server does not know it now (an engine that did not answer)
                continue
            total += value
            found = True
    return total if found else None


def autoscaling_status(decision: ScaleDecision, *, previous: Mapping[str, Any], current_replicas: int,
                       load: Load | None, settings: AutoscalingSettings, now: str) -> dict[str, Any]:
    """`status.autoscaling` after a decision; lastScaleTime and lastScaleReason change only when it scales."""
    block: dict[str, Any] = {
        "desiredReplicas": decision.desired,
        "currentReplicas": current_replicas,
        "recommendedReplicas": decision.recommendation,
        "metric": settings.metric,
        "load": None if load is None else {"total": round(load.total, 3), "perReplica": round(load.per_replica, 3),
                                           "pods": load.pods},
        "message": decision.reason[:1024],
        "lastScaleTime": previous.get("lastScaleTime"),
        "lastScaleReason": previous.get("lastScaleReason"),
    }
    if decision.direction is not None:
        block["lastScaleTime"] = now
        block["lastScaleReason"] = decision.reason[:1024]
    return {key: value for key, value in block.items() if value is not None}


READ_WORKERS = 128


class LoadReader:
    """Reads one metric from the pods' /metrics (short timeouts: a slow pod must not stall the loop)."""

    def __init__(self, timeout: float = READ_TIMEOUT_S, port: int = SERVER_PORT) -> None:
        # as many connections as readers: httpx's default pool (100) would keep readers past it waiting, and failing
        self._http = httpx.Client(timeout=timeout, trust_env=False,
                                  limits=httpx.Limits(max_connections=READ_WORKERS,
                                                      max_keepalive_connections=READ_WORKERS))
        self._port = port

    def close(self) -> None:
        self._http.close()

    def _one(self, ip: str, metric: str) -> float | None:
        """The pod's reading, or None: whatever keeps one pod from answering (a refused or slow connection, an
        address the client cannot use, a body that is not an exposition) leaves that pod out of this look, never the
        deployment's reconcile."""
        try:
            response = self._http.get(pod_url(ip, self._port, "/metrics"))
            response.raise_for_status()
            text = response.text
        except Exception as exc:  # see above: one pod's failure is that pod's missing reading
            log.info("metrics of %s unavailable: %s", ip, exc)
            return None
        value = metric_value(text, metric)
        if value is None:
            log.info("%s reports no %s", ip, metric)
        return value

    def read(self, pod_ips: Iterable[str], metric: str) -> Load | None:
        """The pods' summed `metric`, asked of up to READ_WORKERS pods at once (so a look takes one timeout at most
        while no more than that many pods are slow); None when none answered."""
        ips = list(pod_ips)
        if not ips:
            return None
        with ThreadPoolExecutor(max_workers=min(READ_WORKERS, len(ips))) as pool:
            values = [value for value in pool.map(lambda ip: self._one(ip, metric), ips) if value is not None]
        return Load(sum(values), len(values), len(ips)) if values else None


class Autoscaler:
    """Per-deployment recommendation histories (in memory: after a restart the windows fill again before any
    scaling, so a restart never scales on a partial window)."""

    def __init__(self, reader: LoadReader | None = None, *, clock: Callable[[], float] = time.time,
                 interval: float | None = None) -> None:
        self._reader = reader or LoadReader()
        self._clock = clock
        self.interval = autoscale_interval() if interval is None else interval
        self._histories: dict[tuple[str, str, str], list[Sample]] = {}
        self._guard = threading.Lock()

    def step(self, dsd: Mapping[str, Any], *, active_replicas: int | None, ready_pod_ips: Sequence[str],
             pending_for_gpus: int) -> tuple[dict[str, Any], ScaleDecision] | None:
        """Decide for one deployment: the new `status.autoscaling` and the decision; None when autoscaling is off
        or nothing serves yet (the history is dropped then)."""
        meta = dsd["metadata"]
        key = (meta["namespace"], meta["name"], meta.get("uid", ""))
        settings = AutoscalingSettings.from_spec(dsd["spec"])
        status = dsd.get("status") or {}
        if settings is None or active_replicas is None:
            with self._guard:
                self._histories.pop(key, None)
            return None
        previous = status.get("autoscaling") or {}
        current = previous.get("desiredReplicas")
        current = current if isinstance(current, int) else active_replicas
        phase = (status.get("rollout") or {}).get("phase")
        rollout = phase if phase in IN_PROGRESS_PHASES else None
        now = self._clock()
        load = self._reader.read(ready_pod_ips, METRICS[settings.metric]) if ready_pod_ips else None
        with self._guard:
            history = self._histories.setdefault(key, [])
            if load is not None and rollout is None:
                history.append(Sample(now, recommend(load.total, settings), load.complete))
            history[:] = trim_history(history, now, settings)
            snapshot = list(history)
        decision = decide(settings, current=current, load=load, history=snapshot, now=now, rollout=rollout,
                          pending_for_gpus=pending_for_gpus,
                          max_gap=GAP_INTERVALS * self.interval + 2 * READ_TIMEOUT_S)
        block = autoscaling_status(decision, previous=previous, current_replicas=active_replicas, load=load,
                                   settings=settings, now=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
        return block, decision

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            for key in [key for key in self._histories if key[:2] == (namespace, name)]:
                del self._histories[key]
