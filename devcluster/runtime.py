"""How the node agent runs a pod: the runtime interface, and the simulated runtime for images with no mapping.

A runtime owns the pods the agent hands it. ``sync`` is called often (every agent tick) and returns the pod's
observed status as a dict (the Kubernetes ``PodStatus`` shape, camelCase); the agent writes it when it changes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

Pod = dict[str, Any]


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_key(pod: Pod) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


class PodRuntime(Protocol):
    """Runs pods bound to the agent's nodes."""

    def sync(self, pod: Pod, pod_ip: str, host_ip: str) -> dict[str, Any]:
        """Make sure the pod runs; return its current status."""

    def stop(self, pod: Pod, grace_seconds: float) -> None:
        """End the pod (SIGTERM, grace, SIGKILL for processes); blocks until it is gone."""

    def retain(self, uids: set[str]) -> None:
        """Forget (and stop, in the background) pods not in `uids`: they vanished without a graceful delete."""

    def shutdown(self) -> None:
        """End every pod this runtime started (the agent is exiting)."""


def condition(kind: str, status: bool, since: str, reason: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": kind, "status": "True" if status else "False", "lastProbeTime": None,
                            "lastTransitionTime": since}
    if reason:
        cond["reason"] = reason
    return cond


class SimulatedRuntime:
    """Pods whose images run nowhere: reported Running and Ready as soon as they are bound (a GPU 'kubelet')."""

    def __init__(self) -> None:
        self._started: dict[str, str] = {}

    def sync(self, pod: Pod, pod_ip: str, host_ip: str) -> dict[str, Any]:
        uid = pod["metadata"]["uid"]
        started = self._started.setdefault(uid, now_rfc3339())
        containers = pod["spec"].get("containers", [])
        statuses = [{
            "name": c["name"], "image": c.get("image", ""), "imageID": f"devcluster-simulated://{c.get('image', '')}",
            "containerID": f"devcluster://{uid}/{c['name']}", "ready": True, "started": True, "restartCount": 0,
            "state": {"running": {"startedAt": started}},
        } for c in containers]
        return {
            "phase": "Running",
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "startTime": started,
            "qosClass": pod.get("status", {}).get("qosClass"),
            "conditions": [
                condition("PodReadyToStartContainers", True, started),
                condition("Initialized", True, started),
                condition("Ready", True, started),
                condition("ContainersReady", True, started),
                condition("PodScheduled", True, started),
            ],
            "containerStatuses": statuses,
        }

    def stop(self, pod: Pod, grace_seconds: float) -> None:
        self._started.pop(pod["metadata"]["uid"], None)

    def retain(self, uids: set[str]) -> None:
        for uid in set(self._started) - uids:
            self._started.pop(uid, None)

    def shutdown(self) -> None:
        self._started.clear()
