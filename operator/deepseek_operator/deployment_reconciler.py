"""The DeepSeekDeployment reconcile: it settles the issuer (signing keys, auth ConfigMap), decides the active color's
replicas when autoscaling is on (autoscaler.py), then runs the pods, Services and blue-green rollout (serving.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .autoscaler import Autoscaler
from .capacity import gpu_shortage
from .conditions import merge_conditions
from .deployment_status import conflict_condition, issuer_status
from .durations import format_timestamp
from .issuer import IN_SIGNING_KEY_NAMESPACE, Issuers, IssuerState
from .kube import DEEPSEEKDEPLOYMENTS, KubeApi, NotOwned
from .names import auth_configmap_name
from .serving import ServingReconciler, status_patch
from .workloads import (
    COLOR_LABEL,
    DEPLOYMENT_LABEL,
    DEPLOYMENTS,
    PODS,
    REVISION_LABEL,
    color_deployment_name,
    label_selector_text,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentResult:
    next_due: float | None
    wake_keys: bool
    wake_waiting_keys: bool = False


class DeploymentReconciler:
    def __init__(self, kube: KubeApi, issuers: Issuers, *, clock: Callable[[], float] = time.time,
                 serving: ServingReconciler | None = None, conflict_recheck: float = 5.0,
                 autoscaler: Autoscaler | None = None) -> None:
        self._kube = kube
        self._issuers = issuers
        self._clock = clock
        self._conflict_recheck = conflict_recheck  # seconds between looks at a child name someone else holds
        self._serving = serving  # pods, Services and the blue-green rollout
        # Load-based replicas of the active color; it decides, the rollout (in `serving`) scales.
        self._autoscaler = autoscaler or (Autoscaler(clock=clock) if serving is not None else None)
        self._capacity_warned: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        # Reconciles waiting for a deployment's lock: the one holding it then leaves its serving pass early.
        self._waiting: Counter[tuple[str, str]] = Counter()
        self._guard = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> DeploymentResult:
        key = (namespace, name)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            self._waiting[key] += 1
        lock.acquire()
        try:
            with self._guard:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
            return self._reconcile(namespace, name, superseded=lambda: self._waiting.get(key, 0) > 0)
        finally:
            lock.release()

    def _reconcile(self, namespace: str, name: str, superseded: Callable[[], bool]) -> DeploymentResult:
        dsd = self._kube.get(DEEPSEEKDEPLOYMENTS, namespace, name)
        if dsd is None or dsd["metadata"].get("deletionTimestamp"):
            return DeploymentResult(None, False)
        conflicts: list[NotOwned] = []
        try:
            state = self._issuers.reconcile_issuer(dsd)
        except NotOwned as exc:
            conflicts.append(exc)
            state = IssuerState(ready=False, reason="Conflict",
                                message=f"{exc.description}; see condition Conflict", signing_key_id=None,
                                auth_configmap=auth_configmap_name(name),
                                next_check=self._clock() + self._conflict_recheck, keys_affected=False)
        previous = dsd.get("status") or {}
        status = issuer_status(
            previous, ready=state.ready, reason=state.reason, message=state.message,
            signing_key_id=state.signing_key_id, auth_configmap=state.auth_configmap,
            auth_config_size=state.auth_config_size,
            generation=int(dsd["metadata"].get("generation", 1)), now=format_timestamp(self._clock()),
        )
        # The issuer's status fields go out with the serving pass's first status write (one PATCH instead of two,
        # e.g. for an edit), or on their own at the end of this reconcile when nothing wrote them.
        unwritten = status_patch(previous, status)
        next_due = state.next_check
        try:
            # Serving children and the blue-green rollout (serving.py).
            # Not while the issuer's own objects are someone else's: the servers would trust that auth ConfigMap.
            # Nor in the namespace of the private signing keys, where its pods could read them.
            if self._serving is not None and not conflicts and state.reason != IN_SIGNING_KEY_NAMESPACE:
                try:
                    status, autoscale_due = self._autoscale({**dsd, "status": status})
                    if autoscale_due is not None:
                        next_due = min(next_due, autoscale_due)
                    next_due = min(next_due, self._serving.reconcile({**dsd, "status": status}, superseded,
                                                                     unwritten))
                except NotOwned as exc:
                    conflicts.append(exc)
                    next_due = min(next_due, self._clock() + self._conflict_recheck)
        finally:
            if unwritten:
                self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, unwritten)
        self._report_conflicts(dsd, conflicts)
        return DeploymentResult(next_due, state.keys_affected, state.waiting_keys_affected)

    def forget(self, namespace: str, name: str) -> None:
        """The deployment is gone: drop what the autoscaler remembers of it."""
        if self._autoscaler is not None:
            self._autoscaler.forget(namespace, name)
        self._capacity_warned.discard((namespace, name))

    def _autoscale(self, dsd: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
        """Decide the active color's replicas from its pods' load; the status with `autoscaling` written, and when
        to look again (None when autoscaling is off)."""
        status = dsd.get("status") or {}
        if self._autoscaler is None:
            return status, None
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        active = status.get("activeColor")
        workload = self._kube.get(DEPLOYMENTS, namespace, color_deployment_name(name, active)) if active else None
        spec_on = bool((dsd["spec"].get("autoscaling") or {}).get("enabled"))
        ips: list[str] = []
        pending = 0
        if spec_on and workload is not None:
            revision = (workload["spec"]["template"]["metadata"].get("labels") or {}).get(REVISION_LABEL)
            pods = [pod for pod in self._kube.list(PODS, namespace, label_selector=label_selector_text(
                {DEPLOYMENT_LABEL: name, COLOR_LABEL: str(active)}))
                if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision
                and not pod["metadata"].get("deletionTimestamp")]
            ips = [str(pod["status"]["podIP"]) for pod in pods if _ready(pod) and pod["status"].get("podIP")]
            resources = dsd["spec"].get("resources") or {}
            shortage = gpu_shortage(pods, str(resources.get("gpuResourceName", "nvidia.com/gpu")),
                                    int(resources.get("gpus", 1)))
            pending = shortage.pending_pods if shortage else 0
        found = self._autoscaler.step(dsd, active_replicas=int(workload["spec"].get("replicas", 0) or 0)
                                      if workload is not None else None, ready_pod_ips=ips, pending_for_gpus=pending)
        if found is None:
            if "autoscaling" in status and not spec_on:
                self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, {"autoscaling": None})
                status = {key: value for key, value in status.items() if key != "autoscaling"}
            return status, (self._clock() + self._autoscaler.interval if spec_on else None)
        block, decision = found
        previous = status.get("autoscaling") or {}
        if block != previous:
            patch = {**block, **{key: None for key in previous if key not in block}}
            self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, {"autoscaling": patch})
        before = previous.get("desiredReplicas", block["currentReplicas"])
        if decision.direction is not None:
            log.info("%s/%s: autoscaler %d -> %d: %s", namespace, name, before, decision.desired, decision.reason)
            self._kube.post_event(dsd, type_="Normal", reason="ScaledUp" if decision.direction == "up"
                                  else "ScaledDown", message=f"{active}: {before} -> {decision.desired} replica(s); "
                                                             f"{decision.reason}")
        key = (namespace, name)
        if pending > 0 and key not in self._capacity_warned:
            # Once per shortage: the condition CapacityAvailable keeps the numbers current meanwhile.
            self._capacity_warned.add(key)
            self._kube.post_event(dsd, type_="Warning", reason="InsufficientCapacity",
                                  message=f"{active}: the autoscaler wants {decision.desired} replica(s): {len(ips)} "
                                          f"ready, {pending} pending for GPUs; it scales no further up until GPUs "
                                          f"free up ({decision.reason})")
        elif pending == 0:
            self._capacity_warned.discard(key)
        return {**status, "autoscaling": block}, self._clock() + self._autoscaler.interval

    def _report_conflicts(self, dsd: dict[str, Any], conflicts: list[NotOwned]) -> None:
        """The `Conflict` condition and a Warning Event when it names something new; `Resolved` once clear."""
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        condition = conflict_condition((dsd.get("status") or {}).get("conditions"),
                                       [exc.description for exc in conflicts])
        if condition is None:
            return
        # Status was written by the issuer and the rollout since `dsd` was read: merge into what is stored now.
        latest = self._kube.get(DEEPSEEKDEPLOYMENTS, namespace, name)
        if latest is None:
            return
        conditions = merge_conditions((latest.get("status") or {}).get("conditions"), [condition],
                                      now=format_timestamp(self._clock()),
                                      generation=int(latest["metadata"].get("generation", 1)), keep_others=True)
        self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, {"conditions": conditions})
        if condition.status:
            log.warning("%s/%s: %s", namespace, name, condition.message)
            self._kube.post_event(latest, type_="Warning", reason="Conflict", message=condition.message)
        else:
            self._kube.post_event(latest, type_="Normal", reason="ConflictResolved", message=condition.message)


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])
