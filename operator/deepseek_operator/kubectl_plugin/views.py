"""What `kubectl deepseek` decides and prints, as pure functions of the objects it read (no API, `now` passed in).

The rollout annotations are revision-bound (rollout.py): `deepseek.ai/promote` and `deepseek.ai/abort` must name
the revision being rolled out, `deepseek.ai/retry` the failed revision the spec asks for. The functions here pick
that revision from status, or say in words why there is nothing to promote, abort or retry.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ..rollout import (
    AWAITING_PROMOTION,
    BEFORE_SWITCH,
    DEGRADED,
    IN_PROGRESS,
    POST_VERIFYING,
    ROLLING_BACK,
)
from ..tokens import token_sha256
from ..workloads import COLORS, REVISION_LABEL


class PluginError(Exception):
    """A problem the user can act on; printed as one message, without a traceback."""


def _parse(text: str | None) -> float | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def relative(text: str | None, now: float) -> str:
    """'3m ago' / 'in 2h' for an RFC 3339 time, '-' when absent."""
    at = _parse(text)
    if at is None:
        return text or "-"
    seconds = int(at - now)
    span = abs(seconds)
    if span < 120:
        amount = f"{span}s"
    elif span < 7200:
        amount = f"{span // 60}m"
    elif span < 172800:
        amount = f"{span // 3600}h"
    else:
        amount = f"{span // 86400}d"
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _rollout(dsd: Mapping[str, Any]) -> Mapping[str, Any]:
    return (dsd.get("status") or {}).get("rollout") or {}


def _ref(dsd: Mapping[str, Any]) -> str:
    meta = dsd.get("metadata") or {}
    return f"DeepSeekDeployment {meta.get('namespace')}/{meta.get('name')}"


# ---------------------------------------------------------------------------------------------------- actions
def promote_target(dsd: Mapping[str, Any]) -> str:
    """The revision `deepseek.ai/promote` must name now; PluginError when no rollout can be promoted."""
    rollout = _rollout(dsd)
    phase, revision = rollout.get("phase"), rollout.get("revision")
    if phase in BEFORE_SWITCH and revision:
        return str(revision)
    if phase in IN_PROGRESS:
        raise PluginError(f"{_ref(dsd)}: revision {revision} is {phase}; traffic has already been switched or is "
                          "being switched back, so there is nothing to promote")
    active = (dsd.get("status") or {}).get("activeRevision")
    raise PluginError(f"{_ref(dsd)}: no rollout is in progress (last phase: {phase or 'none'}; active revision: "
                      f"{active or 'none'}); nothing to promote")


def abort_target(dsd: Mapping[str, Any]) -> str:
    """The revision `deepseek.ai/abort` must name now; PluginError when no rollout can be aborted."""
    rollout = _rollout(dsd)
    phase, revision = rollout.get("phase"), rollout.get("revision")
    if (phase in BEFORE_SWITCH or phase == POST_VERIFYING) and revision:
        return str(revision)
    if phase == ROLLING_BACK:
        raise PluginError(f"{_ref(dsd)}: revision {revision} is already rolling back ({rollout.get('message', '')})")
    raise PluginError(f"{_ref(dsd)}: no rollout is in progress (last phase: {phase or 'none'}); nothing to abort")


def retry_target(dsd: Mapping[str, Any], desired_revision: str) -> str:
    """The revision `deepseek.ai/retry` must name: the failed revision the spec still asks for."""
    status = dsd.get("status") or {}
    rollout = _rollout(dsd)
    failed = status.get("failedRevision")
    if rollout.get("phase") in IN_PROGRESS:
        raise PluginError(f"{_ref(dsd)}: the rollout of revision {rollout.get('revision')} is "
                          f"{rollout.get('phase')}; wait for it to finish or abort it first")
    if not failed:
        raise PluginError(f"{_ref(dsd)}: no revision has failed; nothing to retry")
    if failed != desired_revision:
        raise PluginError(f"{_ref(dsd)}: the spec asks for revision {desired_revision}, not the failed revision "
                          f"{failed}; a changed spec rolls out on its own, without a retry")
    return str(failed)


def spec_revision(dsd: Mapping[str, Any], compute: Callable[[Mapping[str, Any]], str]) -> str:
    """The revision the spec asks for: the operator's own (status.desiredRevision) when it has seen this
    generation, else `compute(spec)` with this plugin's defaults (an operator of another version may differ)."""
    status = dsd.get("status") or {}
    generation = (dsd.get("metadata") or {}).get("generation")
    if status.get("desiredRevision") and generation is not None and status.get("observedGeneration") == generation:
        return str(status["desiredRevision"])
    return compute(dsd.get("spec") or {})


def retry_needs_reset(dsd: Mapping[str, Any], revision: str) -> bool:
    """Whether the operator still remembers a retry of `revision` (`status.retriedRevision`): the annotation must be
    gone, and status must show the operator saw that, before the same value asks for another retry. Also when the
    annotation was removed by hand and the operator has not reconciled since: set again then, the operator would
    take it for the retry it already ran, and never retry."""
    status = dsd.get("status") or {}
    return status.get("retriedRevision") == revision


def already_asked(dsd: Mapping[str, Any], annotation: str, revision: str) -> bool:
    return _annotations(dsd).get(annotation) == revision


# ---------------------------------------------------------------------------------------------------- status
def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def _color_line(color: str, deployment: Mapping[str, Any] | None, status: Mapping[str, Any]) -> str:
    rollout = status.get("rollout") or {}
    roles = []
    if status.get("activeColor") == color:
        roles.append("active")
    if rollout.get("color") == color and rollout.get("phase") in IN_PROGRESS:
        roles.append("preview")
    role = "+".join(roles) or "idle"
    if deployment is None:
        return f"  {color:<6} {role:<14} not created"
    template = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
    revision = (template.get("labels") or {}).get(REVISION_LABEL, "?")
    wanted = int((deployment.get("spec") or {}).get("replicas") or 0)
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    return f"  {color:<6} {role:<14} revision {revision:<12} {ready}/{wanted} ready"


def _analysis_line(analysis: Mapping[str, Any]) -> str:
    verdict = "not judged" if analysis.get("passed") is None else "passed" if analysis["passed"] else "failed"
    numbers = [f"{analysis.get('requests', 0)} request(s)", f"{analysis.get('errors', 0)} error(s)"]
    if analysis.get("errorRate") is not None:
        numbers.append(f"error rate {float(analysis['errorRate']):.1%}")
    for key, label in (("p50LatencyMs", "p50"), ("p95LatencyMs", "p95")):
        if analysis.get(key) is not None:
            numbers.append(f"{label} {float(analysis[key]):.0f} ms")
    message = f": {analysis['message']}" if analysis.get("message") else ""
    return f"  Verification ({analysis.get('stage', '?')}): {verdict}, {', '.join(numbers)}{message}"


def _next_step(name: str, status: Mapping[str, Any], desired_revision: str | None) -> str | None:
    rollout = status.get("rollout") or {}
    phase = rollout.get("phase")
    if phase == AWAITING_PROMOTION:
        return (f"verified and waiting: `kubectl deepseek promote {name}` switches traffic, "
                f"`kubectl deepseek abort {name}` rolls it back")
    if phase in BEFORE_SWITCH or phase == POST_VERIFYING:
        return f"`kubectl deepseek abort {name}` stops this rollout and keeps traffic on the stable color"
    failed = status.get("failedRevision")
    if phase == DEGRADED and failed and failed == desired_revision:
        return (f"revision {failed} is not retried until the spec changes it or its rollout settings "
                f"(progressDeadlineSeconds, strategy, previewReplicas, analysis); `kubectl deepseek retry {name}` "
                "tries it once more")
    return None


def describe_deployment(dsd: Mapping[str, Any], colors: Mapping[str, Mapping[str, Any] | None],
                        events: Sequence[Mapping[str, Any]], *, desired_revision: str | None, now: float) -> str:
    """`kubectl deepseek status`: the deployment's state in sentences (colors from their apps/v1 Deployments)."""
    meta = dsd.get("metadata") or {}
    name = str(meta.get("name"))
    status = dsd.get("status") or {}
    rollout = status.get("rollout") or {}
    lines = []
    ready = _condition(status, "Ready")
    if ready:
        state = "Ready" if ready.get("status") == "True" else f"Not ready ({ready.get('reason', 'Unknown')})"
        lines.append(f"{_ref(dsd)}: {state}: {ready.get('message', '')}")
    else:
        lines.append(f"{_ref(dsd)}: the operator has not reported on it yet")
    if desired_revision:
        lines.append(f"Spec revision: {desired_revision}"
                     + (" (serving)" if desired_revision == status.get("activeRevision") else ""))
    if status.get("activeColor"):
        lines.append(f"Traffic: {status['activeColor']} (revision {status.get('activeRevision')}), "
                     f"{status.get('readyReplicas', 0)} ready replica(s)")
    else:
        lines.append("Traffic: no revision has been promoted yet")
    if status.get("endpoint"):
        lines.append(f"Endpoint: {status['endpoint']}")
    lines.append("Colors:")
    lines.extend(_color_line(color, colors.get(color), status) for color in COLORS)
    if rollout:
        phase = rollout.get("phase")
        when = [f"started {relative(rollout.get('startedAt'), now)}"]
        if rollout.get("switchedAt"):
            when.append(f"switched {relative(rollout['switchedAt'], now)}")
        if rollout.get("deadline") and phase in IN_PROGRESS:
            when.append(f"deadline {relative(rollout['deadline'], now)}")
        if rollout.get("scaleDownAt") and phase not in IN_PROGRESS:
            when.append(f"old color scales down {relative(rollout['scaleDownAt'], now)}")
        lines.append(f"Rollout: revision {rollout.get('revision')} on {rollout.get('color')} is {phase} "
                     f"({'; '.join(when)})")
        if rollout.get("message"):
            lines.append(f"  {rollout['message']}")
        if rollout.get("reason"):
            lines.append(f"  Reason: {rollout['reason']}")
        if rollout.get("analysis"):
            lines.append(_analysis_line(rollout["analysis"]))
        advice = _next_step(name, status, desired_revision)
        if advice:
            lines.append(f"  Next: {advice}")
    else:
        lines.append("Rollout: none yet")
    if status.get("failedRevision"):
        lines.append(f"Failed revision: {status['failedRevision']}")
    lines.append("Conditions:")
    for condition in status.get("conditions") or []:
        lines.append(f"  {condition.get('type')}={condition.get('status')} ({condition.get('reason', '')}): "
                     f"{condition.get('message', '')}")
    history = status.get("history") or []
    lines.append("History (newest first):" if history else "History: none")
    for entry in history:
        details = ", ".join(f"{key} {entry[key]}" for key in ("model", "image", "engine", "precision")
                            if entry.get(key))
        lines.append(f"  {entry.get('at', '?')}  revision {entry.get('revision')}  {entry.get('result')}"
                     + (f"  ({details})" if details else ""))
    if events:
        lines.append("Recent events:")
        for event in events:
            lines.append(f"  {relative(_event_time(event), now):>8}  {event.get('type', '')} "
                         f"{event.get('reason', '')}: {event.get('message', '')}")
    return "\n".join(lines)


def _event_time(event: Mapping[str, Any]) -> str | None:
    return event.get("lastTimestamp") or event.get("eventTime") or (event.get("metadata") or {}).get(
        "creationTimestamp")


def recent_events(events: Sequence[Mapping[str, Any]], limit: int = 8) -> list[Mapping[str, Any]]:
    """The newest `limit` events, oldest first."""
    ordered = sorted(events, key=lambda event: _parse(_event_time(event)) or 0.0)
    return ordered[-limit:]


# ---------------------------------------------------------------------------------------------------- keys
def keys_table(apikeys: Sequence[Mapping[str, Any]], *, now: float, with_namespace: bool = False) -> str:
    """`kubectl deepseek keys`: one row per ApiKey (never a token)."""
    # TOKEN ISSUED: when the token in force was issued (the first one, or the last rotation); ISSUED: tokens issued
    # to the key so far (status.revision), not how many are out
    header = ["NAME", "DEPLOYMENT", "SUBJECT", "ENV", "SCOPES", "READY", "EXPIRES", "TOKEN ISSUED", "ISSUED"]
    if with_namespace:
        header.insert(0, "NAMESPACE")
    rows = [header]
    for key in sorted(apikeys, key=lambda k: ((k["metadata"].get("namespace") or ""), k["metadata"]["name"])):
        spec, status = key.get("spec") or {}, key.get("status") or {}
        ready = _condition(status, "Ready")
        if spec.get("revoked"):
            ready_text = "Revoked"
        elif ready.get("status") == "True":
            ready_text = "True"
        elif ready:  # False, or Unknown (e.g. AuthConfigUnknown: the deployment's auth config cannot be read)
            ready_text = f"{ready.get('status', 'Unknown')} ({ready.get('reason', 'Pending')})"
        else:
            ready_text = "Pending"
        issued = status.get("issuedAt")
        row = [key["metadata"]["name"], (spec.get("deploymentRef") or {}).get("name", "?"), spec.get("subject", "?"),
               spec.get("environment", "?"), _scopes_text(spec, status),
               ready_text,
               f"{status['expiresAt']} ({relative(status['expiresAt'], now)})" if status.get("expiresAt") else "-",
               f"{issued} ({relative(issued, now)})" if issued else "-",
               str(status.get("revision") or 0)]
        if with_namespace:
            row.insert(0, key["metadata"].get("namespace", ""))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def _scopes_text(spec: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """The key's own scopes; for a key on its deployment's default, what its token holds, or that it is the default."""
    if spec.get("scopes"):
        return ",".join(spec["scopes"])
    held = status.get("tokenScopes")
    return f"{','.join(sorted(held))}(default)" if held else "(deployment default)"


def env_exports(values: Mapping[str, str]) -> str:
    """Shell `export` lines for OPENAI_API_KEY and OPENAI_BASE_URL (quoted for sh, bash and zsh)."""
    return "\n".join(f"export {name}={shlex.quote(values[name])}" for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"))


def stale_token_reason(status: Mapping[str, Any], token: str) -> str | None:
    """Why the token in a key's Secret is not one to hand out, or None when it is the key's current token (or the
    one the operator is making current: `pendingToken`). The Secret can hold a token the operator has revoked and
    not replaced: a key at its bound of tokens out whose subject, scopes or environment changed
    (`TokenLimitReached`), or a token edited in by hand, about to be replaced."""
    sha = token_sha256(token)
    if sha in (status.get("tokenSHA256"), (status.get("pendingToken") or {}).get("tokenSHA256")):
        return None
    ready = _condition(status, "Ready")
    why = f" (Ready={ready.get('status')}, {ready.get('reason')}: {ready.get('message')})" if ready else ""
    if not status.get("tokenSHA256"):
        return f"the key has no token in force now{why}; its Secret still holds one that the servers refuse"
    return f"its Secret holds a token that is not the key's current one{why}; the operator replaces it shortly"
