"""The DeepSeekDeployment reconcile. Today it settles the issuer (signing keys, auth ConfigMap); the pods,
Services and blue-green rollout are further steps called from `reconcile` in their own modules."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .deployment_status import issuer_status
from .durations import format_timestamp
from .issuer import Issuers
from .kube import DEEPSEEKDEPLOYMENTS, KubeApi
from .serving import ServingReconciler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentResult:
    next_due: float | None
    wake_keys: bool


class DeploymentReconciler:
    def __init__(self, kube: KubeApi, issuers: Issuers, *, clock: Callable[[], float] = time.time,
                 serving: ServingReconciler | None = None) -> None:
        self._kube = kube
        self._issuers = issuers
        self._clock = clock
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
            state = self._issuers.reconcile_issuer(dsd)
            previous = dsd.get("status") or {}
            status = issuer_status(
                previous, ready=state.ready, reason=state.reason, message=state.message,
                signing_key_id=state.signing_key_id, auth_configmap=state.auth_configmap,
                generation=int(dsd["metadata"].get("generation", 1)), now=format_timestamp(self._clock()),
            )
            if status != previous:
                self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, status)
            next_due = state.next_check
            # --- issue 6: serving children and the blue-green rollout (serving.py) ---
            if self._serving is not None:
                next_due = min(next_due, self._serving.reconcile({**dsd, "status": status}))
            # --- end issue 6 ---
            return DeploymentResult(next_due, state.jwks_changed)
