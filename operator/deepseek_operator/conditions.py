"""Kubernetes-style status conditions: recomputed every reconcile, `lastTransitionTime` kept unless the status flips."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Condition:
    """One desired condition, before timestamps are attached."""

    type: str
    status: bool | None  # None is Unknown
    reason: str
    message: str

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else ("True" if self.status else "False")


def merge_conditions(
    previous: Sequence[dict[str, Any]] | None,
    desired: Iterable[Condition],
    *,
    now: str,
    generation: int,
    keep_others: bool = False,
) -> list[dict[str, Any]]:
    """Conditions as status stores them; a condition keeps its lastTransitionTime while its status is unchanged.

    With `keep_others`, conditions of other types already present (written by another part of the reconcile) stay.
    """
    before = {item.get("type"): item for item in previous or []}
    merged: list[dict[str, Any]] = []
    seen: set[str] = set()
    for condition in desired:
        seen.add(condition.type)
        old = before.get(condition.type)
        status = condition.status_text
        flipped = old is None or old.get("status") != status
        merged.append({
            "type": condition.type,
            "status": status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": now if flipped or old is None or not old.get("lastTransitionTime")
            else old["lastTransitionTime"],
            "observedGeneration": generation,
        })
    if keep_others:
        merged.extend(item for item in previous or [] if item.get("type") not in seen)
    return sorted(merged, key=lambda item: str(item["type"]))


def condition_status(conditions: Sequence[dict[str, Any]] | None, type_: str) -> str | None:
    """The status text ("True"/"False"/"Unknown") of one condition, or None when absent."""
    for item in conditions or []:
        if item.get("type") == type_:
            return str(item.get("status"))
    return None


def condition_reason(conditions: Sequence[dict[str, Any]] | None, type_: str) -> str | None:
    """The reason of one condition, or None when absent."""
    for item in conditions or []:
        if item.get("type") == type_:
            return item.get("reason")
    return None
