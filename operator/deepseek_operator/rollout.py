"""The blue-green rollout as a pure function: an observed snapshot in, a Decision (data) out.

Phases (DESIGN.md, "Blue-green rollout"):

    Provisioning -> Starting -> Verifying -> [AwaitingPromotion] -> Promoting -> PostVerifying -> Completed
         any failure, deadline or abort  -> RollingBack -> Degraded

All rollout state lives in the DeepSeekDeployment's status (`activeColor`, `activeRevision`, `failedRevision`,
`retriedRevision`, `rollout`, `history`), so a restarted operator decides exactly as the one before it. Side effects
(scaling, switching the Service, sending verification requests) are requested through the Decision and carried out
by `deployment_reconcile`; a verification result is written to status and then decided on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .autoscaler import effective_replicas
from .capacity import CapacityShortage, gpu_shortage
from .conditions import Condition
from .pod_failures import pod_failure
from .workloads import COLORS, REVISION_LABEL, other_color

PROVISIONING = "Provisioning"
STARTING = "Starting"
VERIFYING = "Verifying"
AWAITING_PROMOTION = "AwaitingPromotion"
PROMOTING = "Promoting"
POST_VERIFYING = "PostVerifying"
COMPLETED = "Completed"
ROLLING_BACK = "RollingBack"
DEGRADED = "Degraded"
IN_PROGRESS = (PROVISIONING, STARTING, VERIFYING, AWAITING_PROMOTION, PROMOTING, POST_VERIFYING, ROLLING_BACK)
BEFORE_SWITCH = (PROVISIONING, STARTING, VERIFYING, AWAITING_PROMOTION, PROMOTING)

PROMOTE_ANNOTATION = "deepseek.ai/promote"
ABORT_ANNOTATION = "deepseek.ai/abort"
RETRY_ANNOTATION = "deepseek.ai/retry"

# Live traffic is judged only once it is large enough for a rate to mean something.
MIN_LIVE_REQUESTS = 10


def format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 time as status holds it (whole seconds, `Z`; fractions and offsets read too).

    None when absent or unreadable: a time this operator cannot read counts as not set, never as a failed reconcile.
    """
    if not text or not isinstance(text, str):
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def read_rollout_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The rollout's own status fields, read tolerantly across operator versions.

    Fields another version added are left out (and left alone in the stored status: it is written as a merge
    patch); a field missing here gets its default; a `rollout` still in progress but without the revision or the
    color it moves to cannot be continued and reads as no rollout, so the next step starts over from the spec.
    """
    def text(value: Any) -> str | None:
        return value if isinstance(value, str) and value else None

    rollout = dict(status.get("rollout") or {}) if isinstance(status.get("rollout"), Mapping) else {}
    if rollout.get("phase") in IN_PROGRESS and not (text(rollout.get("revision"))
                                                    and rollout.get("color") in COLORS):
        rollout = {}
    history = status.get("history") if isinstance(status.get("history"), list) else []
    active = status.get("activeColor")
    return {
        "activeColor": active if active in COLORS else None,
        "activeRevision": text(status.get("activeRevision")),
        "failedRevision": text(status.get("failedRevision")),
        "failedSettings": (dict(status["failedSettings"]) if isinstance(status.get("failedSettings"), Mapping)
                           else None),
        "retriedRevision": text(status.get("retriedRevision")),
        "rollout": rollout or None,
        "history": [entry for entry in history if isinstance(entry, Mapping)],
    }


# ---------------------------------------------------------------------------------------------------- observation
@dataclass(frozen=True)
class ColorObservation:
    """One color's Deployment and pods as observed."""

    exists: bool = False
    revision: str | None = None  # the revision its pod template runs
    replicas: int = 0  # spec.replicas of the Deployment
    ready_pods: tuple[str, ...] = ()  # ready pods of `revision`, by name
    pods: int = 0  # every pod of the color, including terminating ones (they still hold GPUs)
    shortage: CapacityShortage | None = None
    failure: str | None = None  # why a pod of `revision` cannot come up, when it cannot
    failure_reason: str | None = None  # the Kubernetes reason of `failure` (CrashLoopBackOff, FailedMount, ...)
    waiting: str | None = None  # what the first pod of `revision` that is not ready is waiting for

    @property
    def ready(self) -> int:
        return len(self.ready_pods)


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _pod_waiting(pod: Mapping[str, Any]) -> str | None:
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"pod {name} is not scheduled: {condition.get('message', condition.get('reason', ''))}"
    # init containers first: they run first, and the others wait (`PodInitializing`) until they are done
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") != "PodInitializing":
            label = f"pod {name}" + (f" container {container['name']}" if container.get("name") else "")
            return f"{label}: {waiting.get('reason', 'Waiting')} {waiting.get('message', '')}".strip()[:500]
    return f"pod {name} is not ready yet"


def _creation_refused(deployment: Mapping[str, Any]) -> str | None:
    """Why the Deployment's pods cannot be created, as its controller reports it (`ReplicaFailure`: the API server
    refused the pods, e.g. a PriorityClass that does not exist, a ResourceQuota or LimitRange they exceed, a
    PodSecurity level they break), or None. Only while the controller has seen the current template: a condition of
    the previous one says nothing about the new pods."""
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(deployment.get("metadata", {}).get("generation") or 0):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            detail = str(condition.get("message") or condition.get("reason") or "FailedCreate")
            return f"the API server refuses to create its pods: {detail}"[:500]
    return None


def observe_color(deployment: Mapping[str, Any] | None, pods: list[dict[str, Any]], *, gpu_resource: str,
                  gpus_per_pod: int, events: Sequence[Mapping[str, Any]] = ()) -> ColorObservation:
    """Summarize a color from its Deployment (None when absent) and the pods that carry its color label
    (`events`: the namespace's pod Events, where the kubelet reports failed mounts)."""
    if deployment is None:
        return ColorObservation(pods=len(pods))
    revision = (deployment["spec"]["template"]["metadata"].get("labels") or {}).get(REVISION_LABEL)
    replicas = int(deployment["spec"].get("replicas", 0) or 0)
    current = [pod for pod in pods if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision
               and not pod["metadata"].get("deletionTimestamp")]
    failures = [found for pod in current if (found := pod_failure(pod, events))]
    not_ready = [pod for pod in current if not _pod_ready(pod)]
    # Pods that were never made say more than the ones that were: without them the color cannot be ready at all.
    refused = _creation_refused(deployment) if len(current) < replicas else None
    return ColorObservation(
        exists=True,
        revision=revision,
        replicas=replicas,
        ready_pods=tuple(sorted(pod["metadata"]["name"] for pod in current if _pod_ready(pod))),
        pods=len(pods),
        shortage=gpu_shortage(current, gpu_resource, gpus_per_pod),
        failure=failures[0].message if failures else None,
        failure_reason=failures[0].reason if failures else None,
        waiting=refused or (_pod_waiting(not_ready[0]) if not_ready else None),
    )


def judging_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The rollout settings that decide whether a revision passes, defaults resolved (pure): how it starts
    (`strategy`, `previewReplicas`), how long it may take (`progressDeadlineSeconds`, which also sizes the startup
    probe of the pods it starts) and how it is verified (`analysis`). A revision that failed under other values is
    retried once under these; `autoPromote`, `scaleDownDelaySeconds` and `revisionHistoryLimit` judge nothing."""
    rollout = spec.get("rollout") or {}
    analysis = rollout.get("analysis") or {}
    return {
        "strategy": str(rollout.get("strategy", "BlueGreen")),
        "previewReplicas": int(rollout.get("previewReplicas", 1)),
        "progressDeadlineSeconds": int(rollout.get("progressDeadlineSeconds", 1800)),
        "analysis": {
            "smokePrompt": str(analysis.get("smokePrompt", "Say hello in one short sentence.")),
            "requests": int(analysis.get("requests", 5)),
            "maxErrorRate": float(analysis.get("maxErrorRate", 0.05)),
            "maxLatencyMs": int(analysis.get("maxLatencyMs", 30000)),
            "windowSeconds": int(analysis.get("windowSeconds", 300)),
        },
    }


def settings_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What differs between two `judging_settings`, e.g. `progressDeadlineSeconds 60 -> 600` (pure); a changed
    prompt is named, not quoted."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes.extend(f"{key}.{change}" for change in settings_changes(old, new))
        elif old != new:
            changes.append(f"{key} changed" if key == "smokePrompt" else f"{key} {old} -> {new}")
    return changes


@dataclass(frozen=True)
class RolloutSettings:
    """The spec's rollout knobs plus the operator's polling intervals (seconds)."""

    replicas: int = 1
    strategy: str = "BlueGreen"
    auto_promote: bool = True
    preview_replicas: int = 1
    progress_deadline: float = 1800.0
    window: float = 300.0
    scale_down_delay: float = 300.0
    history_limit: int = 3
    max_error_rate: float = 0.05
    progressing_interval: float = 2.0
    stable_interval: float = 30.0
    # `judging_settings` of the spec: recorded with each rollout, and with a revision that failed
    judging: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], *, progressing_interval: float,
                  stable_interval: float, status: Mapping[str, Any] | None = None) -> RolloutSettings:
        """With autoscaling, `replicas` is the autoscaler's count from `status` (autoscaler.effective_replicas)."""
        rollout = spec.get("rollout") or {}
        analysis = rollout.get("analysis") or {}
        return cls(
            replicas=effective_replicas(spec, status or {}),
            strategy=str(rollout.get("strategy", "BlueGreen")),
            auto_promote=bool(rollout.get("autoPromote", True)),
            preview_replicas=int(rollout.get("previewReplicas", 1)),
            progress_deadline=float(rollout.get("progressDeadlineSeconds", 1800)),
            window=float(analysis.get("windowSeconds", 300)),
            scale_down_delay=float(rollout.get("scaleDownDelaySeconds", 300)),
            history_limit=int(rollout.get("revisionHistoryLimit", 3)),
            max_error_rate=float(analysis.get("maxErrorRate", 0.05)),
            progressing_interval=progressing_interval,
            stable_interval=stable_interval,
            judging=judging_settings(spec),
        )


@dataclass(frozen=True)
class LiveTraffic:
    """Requests and server errors (5xx) the new color's pods counted since they started (from /metrics)."""

    requests: int
    errors: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Observed:
    """Everything a rollout decision depends on."""

    now: float
    desired_revision: str
    settings: RolloutSettings
    status: Mapping[str, Any]
    colors: Mapping[str, ColorObservation]
    annotations: Mapping[str, str] = field(default_factory=dict)
    # (color, revision) the active Service selects, or None when it does not exist
    service_target: tuple[str, str] | None = None
    live: LiveTraffic | None = None
    summary: Mapping[str, str] = field(default_factory=dict)  # model, image, precision of the desired revision


# ---------------------------------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class ScaleColor:
    """Make `color`'s Deployment run `replicas`; with a revision, (re)build its template for that revision."""

    color: str
    replicas: int
    revision: str | None = None


@dataclass(frozen=True)
class SwitchTraffic:
    """Point the active Service at `color` running `revision`."""

    color: str
    revision: str


@dataclass(frozen=True)
class PointPreview:
    """Point the preview Service at `color` running `revision`."""

    color: str
    revision: str


@dataclass(frozen=True)
class Verify:
    """Send real inference requests to the ready pods of `color`; `only` limits it to those pods."""

    color: str
    revision: str
    stage: str
    min_pods: int
    only: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventNote:
    type: str
    reason: str
    message: str


@dataclass
class Decision:
    """What to do now: status to write, children to change, and when to look again."""

    status: dict[str, Any]
    scale: list[ScaleColor] = field(default_factory=list)
    switch: SwitchTraffic | None = None
    preview: PointPreview | None = None
    verify: Verify | None = None
    events: list[EventNote] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    requeue_after: float = 30.0
    again: bool = False  # decide again at once (the state moved on and the next phase may act right away)
    # annotation -> the value to remove it at: left from an earlier attempt of the revision being tried again
    stale_annotations: dict[str, str] = field(default_factory=dict)


class _Builder:
    """Accumulates one decision; phase functions read the snapshot and call these."""

    def __init__(self, observed: Observed) -> None:
        self.o = observed
        self.status: dict[str, Any] = read_rollout_status(observed.status)
        self.decision = Decision(status=self.status, requeue_after=observed.settings.stable_interval)

    @property
    def rollout(self) -> dict[str, Any]:
        return self.status["rollout"] or {}

    def set_rollout(self, **changes: Any) -> None:
        merged = {**self.rollout, **changes}
        self.status["rollout"] = {key: value for key, value in merged.items() if value is not None}

    def scale(self, color: str, replicas: int, revision: str | None = None) -> None:
        current = self.o.colors.get(color, ColorObservation())
        # Pods started from zero get the template as built now, also for the revision the color already had: what
        # the revision leaves out but the pods take (the startup probe sized to progressDeadlineSeconds, an
        # operator upgrade's template) reaches a retried or restarted revision, and no running pod is replaced.
        if revision is not None and (not current.exists or current.revision != revision
                                     or (current.replicas == 0 and replicas > 0)):
            self.decision.scale.append(ScaleColor(color, replicas, revision))
        elif not current.exists and revision is None:
            return  # nothing to scale, and no revision to build it from
        elif current.replicas != replicas:
            self.decision.scale.append(ScaleColor(color, replicas, None))

    def event(self, type_: str, reason: str, message: str) -> None:
        self.decision.events.append(EventNote(type_, reason, message))

    def progressing(self) -> None:
        self.decision.requeue_after = self.o.settings.progressing_interval

    def again(self) -> None:
        self.decision.again = True
        self.progressing()

    def record_history(self, revision: str, result: str) -> None:
        entry: dict[str, Any] = {"revision": revision, "result": result, "at": format_time(self.o.now)}
        if revision == self.o.desired_revision:
            entry.update({key: value for key, value in self.o.summary.items() if value})
        limit = self.o.settings.history_limit
        self.status["history"] = ([entry, *self.status["history"]])[:limit] if limit > 0 else []


# ---------------------------------------------------------------------------------------------------- phases
def _started_with(b: _Builder) -> tuple[str, int]:
    """How the rollout in progress starts its new color, `strategy` and `previewReplicas`: as when it started
    (`status.rollout.settings`), so that a change made meanwhile applies to the next rollout, not to this one
    (which `failedSettings` then records, and which is no reason to try it again); the spec's for a rollout started
    before settings were recorded."""
    started = b.rollout.get("settings") or {}
    strategy = started.get("strategy", b.o.settings.strategy)
    preview = started.get("previewReplicas", b.o.settings.preview_replicas)
    return str(strategy), int(preview)


def _preview_count(o: Observed, active: str | None, preview_replicas: int) -> int:
    """Replicas of the new color while it is verified: all of them on a first rollout, else previewReplicas."""
    replicas = max(1, o.settings.replicas)
    return replicas if active is None else min(preview_replicas, replicas)


def _start_rollout(b: _Builder) -> None:
    o = b.o
    active = b.status["activeColor"]
    color = other_color(active) if active else COLORS[0]
    idle = o.colors.get(color, ColorObservation())
    desired = o.desired_revision
    base = {"revision": desired, "color": color, "startedAt": format_time(o.now), "switchedAt": None,
            "scaleDownAt": None, "analysis": None, "reason": None, "verifiedPods": None,
            "settings": dict(o.settings.judging) or None}
    warm = (active is not None and idle.revision == desired and idle.ready >= max(1, o.settings.replicas)
            and o.settings.strategy == "BlueGreen")
    b.status["rollout"] = None
    if warm:
        # Fast rollback: the idle color still runs this revision and is ready; its pods already served it.
        b.set_rollout(**{**base, "verifiedPods": list(idle.ready_pods)}, phase=PROMOTING,
                      deadline=format_time(o.now + o.settings.progress_deadline),
                      message=f"{color} still runs revision {desired} warm: switching back at once")
        b.event("Normal", "RolloutStarted", f"revision {desired}: fast rollback to the warm {color} color")
    else:
        b.set_rollout(**base, phase=PROVISIONING, deadline=format_time(o.now + o.settings.progress_deadline),
                      message=f"starting revision {desired} in {color}")
        b.event("Normal", "RolloutStarted", f"rolling out revision {desired} to {color}"
                + (f" (active: {active} at {b.status['activeRevision']})" if active else ""))
    b.again()


def _begin_rollback(b: _Builder, reason: str, message: str) -> None:
    # The stable color may have to load its model again: it gets a deadline of its own, like any rollout step.
    b.set_rollout(phase=ROLLING_BACK, reason=reason, message=message,
                  deadline=format_time(b.o.now + b.o.settings.progress_deadline))
    b.again()


def _failed_under(b: _Builder) -> dict[str, Any] | None:
    """The settings a failed rollout was judged under: how it started (`strategy`, `previewReplicas`) as when it
    started, its deadlines and analysis as the spec had them when they were applied, i.e. now (a change made while it
    ran was applied to it, so it is no reason to try the revision again)."""
    started = b.rollout.get("settings")
    judged = dict(b.o.settings.judging)
    if not judged:
        return started
    if started:
        judged.update({key: started[key] for key in ("strategy", "previewReplicas") if key in started})
    return judged


def _deadline_passed(b: _Builder) -> bool:
    deadline = parse_time(b.rollout.get("deadline"))
    return deadline is not None and b.o.now >= deadline


def _steady(b: _Builder) -> None:
    o = b.o
    active, active_revision = b.status["activeColor"], b.status["activeRevision"]
    desired = o.desired_revision
    phase = b.rollout.get("phase")
    if active is not None and active_revision is not None:
        b.scale(active, o.settings.replicas)  # replicas changes need no rollout
    if desired == active_revision:
        if phase == DEGRADED and b.status["failedRevision"] != desired:
            b.set_rollout(phase=COMPLETED, message=f"spec is back at the active revision {desired}; revision "
                                                   f"{b.status['failedRevision']} was rolled back")
        idle = other_color(active) if active else None
        scale_down_at = parse_time(b.rollout.get("scaleDownAt"))
        if idle is not None and o.colors.get(idle, ColorObservation()).replicas > 0:
            if scale_down_at is None or o.now >= scale_down_at:
                b.scale(idle, 0)
                b.event("Normal", "ScaledDown", f"scaled {idle} (revision {o.colors[idle].revision}) to zero; "
                                                "its Deployment is kept for history")
            else:
                b.decision.requeue_after = max(1.0, min(o.settings.stable_interval, scale_down_at - o.now))
        return
    if o.settings.replicas == 0:
        return  # scaled to zero: nothing to verify; the new revision rolls out when replicas come back
    retry = o.annotations.get(RETRY_ANNOTATION) == desired and b.status["retriedRevision"] != desired
    if desired == b.status["failedRevision"] and not retry:
        # No retry loop: the failed revision waits for a spec change, the retry annotation, or other rollout settings
        # than it failed under (a longer deadline, a looser analysis), under which it is tried once; a revision that
        # failed before settings were recorded (an older operator) waits as it did.
        failed_under = b.status["failedSettings"]
        if not failed_under or not o.settings.judging or failed_under == o.settings.judging:
            return
        b.event("Normal", "RetryingRevision",
                f"revision {desired} failed under other rollout settings; trying it once under these: "
                + ", ".join(settings_changes(failed_under, o.settings.judging)))
    if retry:
        b.status["retriedRevision"] = desired
    # An abort or promotion naming the revision was given to the attempt that failed: left set, it would abort the
    # new attempt at once or skip its AwaitingPromotion. The new attempt starts without them (the reconciler removes
    # them, guarded by their value, and posts AnnotationsCleared for those it removed).
    b.decision.stale_annotations = {name: desired for name in (ABORT_ANNOTATION, PROMOTE_ANNOTATION)
                                    if desired == b.status["failedRevision"] and o.annotations.get(name) == desired}
    _start_rollout(b)


def _provisioning(b: _Builder) -> None:
    o = b.o
    color, revision = b.rollout["color"], b.rollout["revision"]
    active = b.status["activeColor"]
    strategy, preview_replicas = _started_with(b)
    if strategy == "Recreate" and active is not None:
        current = o.colors.get(active, ColorObservation())
        b.scale(active, 0)
        if current.pods > 0:
            b.set_rollout(message=f"Recreate: waiting for the {current.pods} pod(s) of {active} to stop")
            b.progressing()
            return
    count = _preview_count(o, active, preview_replicas) if strategy == "BlueGreen" else max(1, o.settings.replicas)
    b.scale(color, count, revision)
    b.decision.preview = PointPreview(color, revision)
    b.set_rollout(phase=STARTING, message=f"waiting for {count} pod(s) of {color} to load revision {revision}")
    b.again()


def _target_count(b: _Builder) -> int:
    o = b.o
    strategy, preview_replicas = _started_with(b)
    if strategy == "Recreate" or b.status["activeColor"] in (None, b.rollout["color"]):
        return max(1, o.settings.replicas)
    return _preview_count(o, b.status["activeColor"], preview_replicas)


def _starting(b: _Builder) -> None:
    o = b.o
    color, revision = b.rollout["color"], b.rollout["revision"]
    count = _target_count(b)
    b.scale(color, count, revision)
    b.decision.preview = PointPreview(color, revision)
    state = o.colors.get(color, ColorObservation())
    if state.failure:
        # Known to be hopeless (pod_failures.py): roll back now instead of at the deadline.
        _begin_rollback(b, state.failure_reason or "ServerFailing", state.failure)
        return
    if state.revision == revision and state.ready >= count:
        # a deadline of its own: the check may wait for the preview Service's endpoints or a published signing key
        b.set_rollout(phase=VERIFYING, deadline=format_time(o.now + o.settings.progress_deadline),
                      message=f"verifying revision {revision} on {state.ready} pod(s) of {color}")
        b.again()
        return
    if _deadline_passed(b):
        _begin_rollback(b, "ProgressDeadlineExceeded",
                        f"{state.ready}/{count} pod(s) of {color} ready within "
                        f"{int(o.settings.progress_deadline)} s: {_waiting_detail(state, color)}")
        return
    _report_waiting(b, state, color, count)


def _analysis(b: _Builder, stage: str) -> Mapping[str, Any] | None:
    analysis = b.rollout.get("analysis") or {}
    return analysis if analysis.get("stage") == stage and b.rollout.get("phase") == stage else None


def _verifying(b: _Builder) -> None:
    o = b.o
    color, revision = b.rollout["color"], b.rollout["revision"]
    count = _target_count(b)
    result = _analysis(b, VERIFYING)
    if result is None:
        state = o.colors.get(color, ColorObservation())
        if state.ready < count:
            b.set_rollout(phase=STARTING, message=f"{state.ready}/{count} pod(s) of {color} ready again")
            b.again()
            return
        if _deadline_passed(b):  # the check never ran: it waits for what the pods' readiness does not show
            _begin_rollback(b, "ProgressDeadlineExceeded",
                            f"revision {revision} on {color} could not be verified within "
                            f"{int(o.settings.progress_deadline)} s: its {count} ready pod(s) were not all in the "
                            "preview Service's endpoints, or the deployment had no published signing key")
            return
        b.decision.verify = Verify(color, revision, VERIFYING, count)
        b.progressing()
        return
    if not result.get("passed"):
        _begin_rollback(b, "VerificationFailed", str(result.get("message", "verification failed")))
        return
    b.event("Normal", "Verified", f"revision {revision} on {color}: {result.get('message', '')}")
    first = b.status["activeColor"] is None  # nothing serves yet: there is nothing to protect by waiting
    if o.settings.auto_promote or first or o.annotations.get(PROMOTE_ANNOTATION) == revision:
        b.set_rollout(phase=PROMOTING, deadline=format_time(o.now + o.settings.progress_deadline),
                      message=f"scaling {color} to {o.settings.replicas} replica(s)")
    else:
        b.set_rollout(phase=AWAITING_PROMOTION, deadline=None,
                      message=f"verified; annotate {PROMOTE_ANNOTATION}={revision} to switch traffic")
    b.again()


def _awaiting_promotion(b: _Builder) -> None:
    o = b.o
    revision = b.rollout["revision"]
    asked = o.annotations.get(PROMOTE_ANNOTATION) == revision
    if asked or o.settings.auto_promote:
        # spec.rollout.autoPromote turned on while waiting: the revision is verified, so it goes as it would have
        b.set_rollout(phase=PROMOTING, deadline=format_time(o.now + o.settings.progress_deadline),
                      message=f"promotion asked for by {PROMOTE_ANNOTATION}" if asked else
                      "spec.rollout.autoPromote was turned on: promoting the verified revision")
        b.again()
        return
    b.decision.requeue_after = o.settings.stable_interval


def _promoting(b: _Builder) -> None:
    o = b.o
    color, revision = b.rollout["color"], b.rollout["revision"]
    replicas = max(1, o.settings.replicas)
    active = b.status["activeColor"]
    state = o.colors.get(color, ColorObservation())
    result = _analysis(b, PROMOTING)
    if result is not None and not result.get("passed"):
        _begin_rollback(b, "VerificationFailed", str(result.get("message", "verification failed")))
        return
    b.scale(color, replicas, revision)
    if state.failure:
        # Known to be hopeless (pod_failures.py): roll back now instead of at the deadline.
        _begin_rollback(b, state.failure_reason or "ServerFailing", state.failure)
        return
    if state.shortage and active is not None and active != color:
        # Not enough GPUs for two full colors: hand one GPU replica over at a time, never the last serving one,
        # and only once the previous step has settled (terminating pods still hold their GPUs).
        serving = o.colors.get(active, ColorObservation())
        if serving.replicas > 1 and serving.pods <= serving.replicas and serving.ready >= serving.replicas:
            b.scale(active, serving.replicas - 1)
            b.event("Normal", "CapacityHandover", f"{state.shortage.describe(color)}; {active} gives up one "
                                                  f"replica ({serving.replicas} -> {serving.replicas - 1})")
    if state.revision == revision and state.ready >= replicas:
        unverified = tuple(sorted(set(state.ready_pods) - set(b.rollout.get("verifiedPods") or [])))
        if unverified:
            b.decision.verify = Verify(color, revision, PROMOTING, len(unverified), only=unverified)
            b.progressing()
            return
        b.decision.switch = SwitchTraffic(color, revision)
        previous = b.status["activeRevision"]
        b.status["activeColor"], b.status["activeRevision"] = color, revision
        b.set_rollout(phase=POST_VERIFYING, switchedAt=format_time(o.now), deadline=None,
                      message=f"traffic on {color}; watching live traffic for {int(o.settings.window)} s")
        b.event("Normal", "Promoted", f"traffic switched to {color} (revision {revision})"
                + (f" from {active} (revision {previous})" if active else ""))
        b.again()
        return
    if _deadline_passed(b):
        _begin_rollback(b, "ProgressDeadlineExceeded", f"{state.ready}/{replicas} pod(s) of {color} ready in time: "
                                                       f"{_waiting_detail(state, color)}")
        return
    _report_waiting(b, state, color, replicas)


def _waiting_detail(state: ColorObservation, color: str) -> str:
    """Why `color`'s pods are not all ready: a GPU shortage, what a pod waits for, or nothing known."""
    if state.shortage:
        return state.shortage.describe(color)
    return state.waiting or "pods did not become ready"


def _report_waiting(b: _Builder, state: ColorObservation, color: str, wanted: int) -> None:
    """Still within the deadline: say how many of `color`'s pods are ready and what the rest wait for."""
    known = state.shortage.describe(color) if state.shortage else state.waiting
    b.set_rollout(message=f"{state.ready}/{wanted} pod(s) of {color} ready" + (f"; {known}" if known else ""))
    b.progressing()


def _judge_live_traffic(b: _Builder) -> tuple[str, str] | None:
    """Record the post-switch analysis; (reason, message) when the new color fails it, else None."""
    o = b.o
    color = b.rollout["color"]
    state = o.colors.get(color, ColorObservation())
    live = o.live
    if live is not None:
        judged = live.requests >= MIN_LIVE_REQUESTS
        seen = f"{live.errors} server error(s) in {live.requests} request(s) on {color}"
        analysis = {"stage": POST_VERIFYING, "requests": live.requests, "errors": live.errors,
                    "errorRate": round(live.error_rate, 4),
                    "message": seen if judged else f"{seen}: not judged until {MIN_LIVE_REQUESTS} requests have come"}
        if judged:  # too few requests for a rate to mean anything: no verdict, and the rollout goes on
            analysis["passed"] = live.error_rate <= o.settings.max_error_rate
        b.set_rollout(analysis=analysis)
    if state.ready == 0:
        return "NoReadyReplicas", f"no pod of {color} is ready after the switch"
    if live is not None and live.requests >= MIN_LIVE_REQUESTS and live.error_rate > o.settings.max_error_rate:
        return ("PostVerificationFailed",
                f"error rate {live.error_rate:.1%} ({live.errors}/{live.requests}) on {color} is above "
                f"{o.settings.max_error_rate:.1%}")
    return None


def _post_verifying(b: _Builder) -> None:
    o = b.o
    color, revision = b.rollout["color"], b.rollout["revision"]
    failure = _judge_live_traffic(b)
    if failure is not None:
        _begin_rollback(b, *failure)
        return
    switched = parse_time(b.rollout.get("switchedAt")) or o.now
    if o.now < switched + o.settings.window:
        b.decision.requeue_after = max(0.5, min(o.settings.progressing_interval, switched + o.settings.window - o.now))
        return
    if o.colors.get(other_color(color), ColorObservation()).replicas > 0:
        scale_down_at = o.now + o.settings.scale_down_delay
        b.set_rollout(phase=COMPLETED, scaleDownAt=format_time(scale_down_at), reason=None,
                      message=f"revision {revision} serves on {color}; the old color is kept warm until "
                              f"{format_time(scale_down_at)}")
    else:  # a first rollout, or one after a scale to zero: there is no old color to keep warm
        b.set_rollout(phase=COMPLETED, scaleDownAt=None, reason=None, message=f"revision {revision} serves on {color}")
    if b.status["failedRevision"] == revision:
        b.status["failedRevision"] = None
        b.status["failedSettings"] = None
    b.record_history(revision, "Completed")
    b.again()


def _rolling_back(b: _Builder) -> None:
    o = b.o
    color, revision = b.rollout["color"], b.rollout["revision"]
    stable = other_color(color)
    stable_state = o.colors.get(stable, ColorObservation())
    has_stable = stable_state.exists and stable_state.revision is not None and (
        b.status["activeColor"] == stable or b.rollout.get("switchedAt") is not None)
    replicas = max(1, o.settings.replicas)
    if b.status["activeColor"] == color and has_stable:
        # Traffic is on the failed color: return it to the stable one, but never to a color with no ready pod.
        b.scale(stable, replicas)
        capacity_bound = stable_state.shortage is not None
        if stable_state.ready >= replicas or (stable_state.ready >= 1 and capacity_bound):
            b.decision.switch = SwitchTraffic(stable, str(stable_state.revision))
            b.status["activeColor"], b.status["activeRevision"] = stable, stable_state.revision
        elif _deadline_passed(b) and capacity_bound:
            # The failed color holds the GPUs the stable one needs: waiting longer cannot help. Free them; traffic
            # switches back as soon as a pod of the stable color is ready.
            failed_state = o.colors.get(color, ColorObservation())
            b.scale(color, 0)
            if failed_state.replicas > 0:
                b.event("Warning", "CapacityHandover",
                        f"{stable_state.shortage.describe(stable) if stable_state.shortage else stable}; rollback "
                        f"deadline passed: scaled the failed {color} to zero to free its GPUs")
            b.set_rollout(message=f"rollback deadline passed with {stable_state.ready}/{replicas} pod(s) of {stable} "
                                  f"ready and short of GPUs: freed the GPUs of {color}; switching back once {stable} "
                                  "has a ready pod")
            b.progressing()
            return
        else:
            late = " (rollback deadline passed)" if _deadline_passed(b) else ""
            b.set_rollout(message=f"waiting for {stable} to be ready before switching back "
                                  f"({stable_state.ready}/{replicas}){late}: {_waiting_detail(stable_state, stable)}")
            b.progressing()
            return
    if b.status["activeColor"] != color:
        b.scale(color, 0)  # free the failed color's GPUs and stop it crash-looping
        if b.status["activeColor"] is not None:
            b.scale(b.status["activeColor"], o.settings.replicas)
    aborted = b.rollout.get("reason") == "Aborted"
    b.status["failedRevision"] = revision
    b.status["failedSettings"] = _failed_under(b)  # what it failed under: other settings retry it once
    b.set_rollout(phase=DEGRADED, deadline=None,
                  message=f"revision {revision} {'aborted' if aborted else 'rolled back'}: "
                          f"{b.rollout.get('message', '')}")
    b.record_history(revision, "Aborted" if aborted else "RolledBack")
    target = b.status["activeColor"]
    b.event("Warning", "RolledBack", f"revision {revision} on {color} {'aborted' if aborted else 'failed'} "
                                     f"({b.rollout.get('reason')}); "
                                     + (f"traffic stays on {target} (revision {b.status['activeRevision']})"
                                        if target else "no earlier revision to return to"))
    b.again()


def _superseded(b: _Builder) -> None:
    """The spec moved on during a rollout: finish or drop the old one, then start the new one."""
    phase, revision = b.rollout["phase"], b.rollout["revision"]
    if phase == POST_VERIFYING:
        # Judge live traffic first: a color failing it must not become the stable one just because the spec
        # moved on, or the next rollout would rebuild the last good color and leave nothing to return to.
        failure = _judge_live_traffic(b)
        if failure is not None:
            reason, message = failure
            _begin_rollback(b, reason, f"{message} (the spec moved on to {b.o.desired_revision} meanwhile)")
            return
        # Traffic already runs on the new color and it passes post-verification: it becomes the stable color.
        b.set_rollout(phase=COMPLETED, scaleDownAt=format_time(b.o.now + b.o.settings.scale_down_delay),
                      message=f"revision {revision} superseded by {b.o.desired_revision} during post-verification")
        b.record_history(revision, "Completed")
    else:
        b.set_rollout(phase=DEGRADED if b.status["activeColor"] is None else COMPLETED,
                      message=f"revision {revision} superseded by {b.o.desired_revision} before the switch")
        b.record_history(revision, "Aborted")
    b.again()


PHASES = {
    PROVISIONING: _provisioning,
    STARTING: _starting,
    VERIFYING: _verifying,
    AWAITING_PROMOTION: _awaiting_promotion,
    PROMOTING: _promoting,
    POST_VERIFYING: _post_verifying,
    ROLLING_BACK: _rolling_back,
}


def _conditions(b: _Builder) -> list[Condition]:
    o = b.o
    status, rollout = b.status, b.rollout
    phase = rollout.get("phase")
    active, active_revision = status["activeColor"], status["activeRevision"]
    serving = o.colors.get(active, ColorObservation()) if active else ColorObservation()
    if active is None:
        ready = Condition("Ready", False, "NoActiveRevision", "no revision has been promoted yet"
                          + (f"; rollout of {rollout.get('revision')} is {phase}" if phase else ""))
    elif o.settings.replicas == 0:
        ready = Condition("Ready", False, "ScaledToZero", f"replicas is 0; {active} (revision {active_revision}) "
                                                          "runs no pod")
    elif serving.ready == 0:
        ready = Condition("Ready", False, "NoReadyReplicas", f"no pod of {active} (revision {active_revision}) "
                                                            "is ready")
    else:
        ready = Condition("Ready", True, "Serving", f"{serving.ready}/{o.settings.replicas} replica(s) of revision "
                                                   f"{active_revision} ready in {active}")
    if phase in IN_PROGRESS:
        progressing = Condition("Progressing", True, phase, str(rollout.get("message", "")))
    elif phase == DEGRADED:
        progressing = Condition("Progressing", False, "RolloutFailed", str(rollout.get("message", "")))
    else:
        progressing = Condition("Progressing", False, "RolloutCompleted" if phase else "NoRollout",
                                str(rollout.get("message", "")) or "nothing to roll out")
    failed = status["failedRevision"]
    if phase == ROLLING_BACK:
        degraded = Condition("Degraded", True, str(rollout.get("reason", "RollingBack")),
                             str(rollout.get("message", "")))
    elif failed and failed == o.desired_revision:
        degraded = Condition("Degraded", True, str(rollout.get("reason") or "RolledBack"),
                             f"revision {failed} was rolled back and is not retried until the spec changes it, "
                             "its rollout settings (progressDeadlineSeconds, strategy, previewReplicas, analysis) "
                             f"change, or {RETRY_ANNOTATION}={failed} is set: {rollout.get('message', '')}")
    else:
        degraded = Condition("Degraded", False, "AsExpected", "the spec'd revision is not known to fail")
    short_color = rollout.get("color") if phase in IN_PROGRESS else active
    shortage = o.colors.get(short_color, ColorObservation()).shortage if short_color else None
    if shortage is not None and short_color is not None:
        scaling = o.status.get("autoscaling") if isinstance(o.status.get("autoscaling"), Mapping) else None
        held = ""
        if short_color == active and scaling is not None and isinstance(scaling.get("desiredReplicas"), int):
            held = (f"; the autoscaler wants {scaling['desiredReplicas']} replica(s): {serving.ready} ready, "
                    f"{shortage.pending_pods} pending for GPUs (no node has {shortage.gpus_per_pod} "
                    f"{shortage.gpu_resource} free); it scales no further up until GPUs free up")
        capacity = Condition("CapacityAvailable", False, "InsufficientGPU", shortage.describe(short_color)
                             + ("; the active color keeps serving" if short_color != active else "") + held)
    else:
        capacity = Condition("CapacityAvailable", True, "Scheduled", "every pod found a node with its GPUs")
    return [ready, progressing, degraded, capacity]


def next_step(observed: Observed) -> Decision:
    """Decide the rollout's next step from one snapshot (pure; no clock, no API)."""
    b = _Builder(observed)
    o = observed
    if o.annotations.get(RETRY_ANNOTATION) != b.status["retriedRevision"] and b.status["retriedRevision"]:
        # The retry annotation was removed or changed: the same revision may be retried again later.
        b.status["retriedRevision"] = None
    phase = b.rollout.get("phase")
    revision = b.rollout.get("revision")
    if phase in IN_PROGRESS:
        if phase != ROLLING_BACK and revision != o.desired_revision:
            _superseded(b)
        elif phase in (*BEFORE_SWITCH, POST_VERIFYING) and o.annotations.get(ABORT_ANNOTATION) == revision:
            _begin_rollback(b, "Aborted", f"aborted by {ABORT_ANNOTATION}={revision}")
        else:
            PHASES[phase](b)
    else:
        _steady(b)
    active, active_revision = b.status["activeColor"], b.status["activeRevision"]
    if (b.decision.switch is None and active is not None and active_revision is not None
            and o.service_target != (active, active_revision)):
        # The active Service follows status (drift, or a crash between switching and writing status).
        b.decision.switch = SwitchTraffic(active, active_revision)
    b.status["previewRevision"] = b.rollout.get("revision") if b.rollout.get("phase") in IN_PROGRESS else None
    b.status["desiredRevision"] = o.desired_revision  # as this operator computes it, for tools reading status
    serving = o.colors.get(active, ColorObservation()) if active else ColorObservation()
    b.status["readyReplicas"] = serving.ready if active else 0
    b.decision.conditions = _conditions(b)
    return b.decision
