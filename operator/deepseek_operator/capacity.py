"""GPU capacity as the scheduler reports it: pods left Pending because no node has enough of the GPU resource.

Pure: reads pod objects, returns numbers and a sentence. The scheduler's own message (e.g. `0/2 nodes are available:
2 Insufficient nvidia.com/gpu.`) carries the per-node numbers, so it is quoted rather than recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CapacityShortage:
    """Pods of one color that cannot be scheduled for lack of GPUs."""

    pending_pods: int
    gpus_per_pod: int
    gpu_resource: str
    scheduler_message: str

    @property
    def gpus_missing(self) -> int:
        return self.pending_pods * self.gpus_per_pod

    def describe(self, color: str) -> str:
        return (f"{self.pending_pods} pod(s) of {color} wait for {self.gpus_per_pod} {self.gpu_resource} each "
                f"({self.gpus_missing} more needed); scheduler: {self.scheduler_message}")


def _unschedulable_message(pod: dict[str, Any]) -> str | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"):
            return str(condition.get("message") or "")
    return None


def gpu_shortage(pods: Iterable[dict[str, Any]], gpu_resource: str, gpus_per_pod: int) -> CapacityShortage | None:
    """The shortage, if any pod is Unschedulable because of `gpu_resource` (other reasons are not a GPU shortage)."""
    pending = 0
    message = ""
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        text = _unschedulable_message(pod)
        if text is not None and gpu_resource in text:
            pending += 1
            message = message or text
    if pending == 0 or gpus_per_pod <= 0:
        return None
    return CapacityShortage(pending, gpus_per_pod, gpu_resource, message)
