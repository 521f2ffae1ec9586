"""The DeepSeekDeployment reconcile. Today it settles the issuer (signing keys, auth ConfigMap); the pods,
Services and blue-green rollout are further steps called from `reconcile` in their own modules."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .conditions import merge_conditions
from .deployment_status import conflict_condition, issuer_status
from .durations import format_timestamp
from .issuer import IN_SIGNING_KEY_NAMESPACE, Issuers, IssuerState
from .kube import DEEPSEEKDEPLOYMENTS, KubeApi, NotOwned
from .names import auth_configmap_name
from .serving import ServingReconciler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentResult:
    next_due: float | None
    wake_keys: bool


class DeploymentReconciler:
    def __init__(self, kube: KubeApi, issuers: Issuers, *, clock: Callable[[], float] = time.time,
                 serving: ServingReconciler | None = None, conflict_recheck: float = 5.0) -> None:
        self._kube = kube
        self._issuers = issuers
        self._clock = clock
        self._conflict_recheck = conflict_recheck  # seconds between looks at a child name someone else holds
        self._serving = serving  # issue 6: pods, Services and the blue-green rollout
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> DeploymentResult:
        with self._guard:
            lock = self._locks.setdefault((namespace, name), threading.Lock())
        with lock:
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
                                    next_check=self._clock() + self._conflict_recheck, jwks_changed=False)
            previous = dsd.get("status") or {}
            status = issuer_status(
                previous, ready=state.ready, reason=state.reason, message=state.message,
                signing_key_id=state.signing_key_id, auth_configmap=state.auth_configmap,
                auth_config_size=state.auth_config_size,
                generation=int(dsd["metadata"].get("generation", 1)), now=format_timestamp(self._clock()),
            )
            if status != previous:
                self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, status)
            next_due = state.next_check
            # --- issue 6: serving children and the blue-green rollout (serving.py) ---
            # Not while the issuer's own objects are someone else's: the servers would trust that auth ConfigMap.
            # Nor in the namespace of the private signing keys, where its pods could read them.
            if self._serving is not None and not conflicts and state.reason != IN_SIGNING_KEY_NAMESPACE:
                try:
                    next_due = min(next_due, self._serving.reconcile({**dsd, "status": status}))
                except NotOwned as exc:
                    conflicts.append(exc)
                    next_due = min(next_due, self._clock() + self._conflict_recheck)
            # --- end issue 6 ---
            self._report_conflicts(dsd, conflicts)
            return DeploymentResult(next_due, state.jwks_changed)

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
