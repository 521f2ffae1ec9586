"""Which pods cannot come up however long the rollout waits, and why (pure: pod statuses and Events in).

A rollout's Starting phase waits up to `progressDeadlineSeconds` for model loading, which is slow. Some failures are
known to be final long before that: an image that cannot be pulled, a container that keeps crashing, a hostPath
that is not on the node. `pod_failure` names them by the reason Kubernetes itself shows (`ImagePullBackOff`,
`CrashLoopBackOff`, `FailedMount`, ...), so the rollout rolls back at once and says why; everything else keeps
the deadline (a Secret, a ConfigMap or a volume claim that is missing now may still appear: a GitOps sync that
applies the deployment before the Redis or Hugging Face token Secret it names, and the kubelet starts the container
as soon as it is there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# A container that crashed and restarted this often and is backing off will not become ready in time.
CRASH_LOOP_RESTARTS = 2
# Waiting reasons that no amount of waiting cures: the image name or registry is wrong, or the container's
# configuration cannot be built (but see MISSING_REFERENCE).
FATAL_WAITING_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
# The kubelet's CreateContainerConfigError for a Secret or ConfigMap (or a key in one) that an env var names and that
# is not there yet (`secret "redis-auth" not found`, `couldn't find key url in Secret ns/redis-auth`): it retries,
# and the container starts once it appears, so the rollout keeps its deadline and says what it waits for.
MISSING_REFERENCE = re.compile(r'(secret|configmap) "[^"]*" not found|couldn\'t find key \S+ in (secret|configmap) ',
                               re.IGNORECASE)
# A mount failure that stays: the kubelet's hostPath type check (the path is missing or of the wrong kind).
FATAL_MOUNT_MARKERS = ("hostPath type check failed",)


@dataclass(frozen=True)
class PodFailure:
    """Why a pod cannot come up: a Kubernetes reason and a sentence with the pod, container and detail."""

    reason: str
    message: str


def last_line(message: str, limit: int = 300) -> str:
    """The last non-empty line of a termination message (under FallbackToLogsOnError, the end of the container's log:
    a failing program says why last, e.g. a traceback's exception), cut to `limit` characters."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _container_failure(pod_name: str, status: Mapping[str, Any]) -> PodFailure | None:
    container = status.get("name", "?")
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in FATAL_WAITING_REASONS and not (reason == "CreateContainerConfigError"
                                                and MISSING_REFERENCE.search(str(waiting.get("message", "")))):
        return PodFailure(str(reason), f"pod {pod_name} container {container}: {reason}: "
                                       f"{waiting.get('message', '')}".strip())
    restarts = int(status.get("restartCount", 0))
    if reason == "CrashLoopBackOff" and restarts >= CRASH_LOOP_RESTARTS:
        last = (status.get("lastState") or {}).get("terminated") or {}
        detail = f"exit code {last.get('exitCode')}" if last else "crashing"
        reason_line = last_line(str(last.get("message") or ""))
        if reason_line:
            detail += f": {reason_line}"
        return PodFailure("CrashLoopBackOff",
                          f"pod {pod_name} container {container} restarted {restarts} times ({detail})")
    return None


def _mount_failure(pod_name: str, message: str) -> PodFailure | None:
    if any(marker in message for marker in FATAL_MOUNT_MARKERS):
        return PodFailure("FailedMount", f"pod {pod_name}: {message[:500]}")
    return None


def pod_failure(pod: Mapping[str, Any], events: Iterable[Mapping[str, Any]] = ()) -> PodFailure | None:
    """The reason `pod` will never become ready, or None while it still may (`events`: the namespace's Events)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    for container in containers:
        failure = _container_failure(name, container)
        if failure is not None:
            return failure
    # The kubelet reports a failed mount as an Event on the pod; devcluster's node agent in the waiting message.
    for container in containers:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in ("ContainerCreating", "PodInitializing") and waiting.get("message"):
            failure = _mount_failure(name, str(waiting["message"]))
            if failure is not None:
                return failure
    uid = pod["metadata"].get("uid")
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") == "FailedMount" and uid and involved.get("uid") == uid:
            failure = _mount_failure(name, str(event.get("message", "")))
            if failure is not None:
                return failure
    return None
