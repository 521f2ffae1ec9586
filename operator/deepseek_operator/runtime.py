"""Everything one running operator holds: the API client, caches, reconcilers, the schedule, worker pools.

Kopf handlers and the schedule loop both go through `OperatorRuntime`, which runs the (blocking) reconciles in
worker pools and decides when each object comes back. Three pools, so that no kind of work queues behind another:
first issuance of new ApiKeys (a burst of thousands), every other ApiKey reconcile (revocation, rotation, deletion,
drift), and DeepSeekDeployments (rollouts, which block on verification). Within first issuance one deployment's
keys never hold every worker, so a new key of another deployment starts at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .apikey_reconciler import ApiKeyReconciler, first_issuance
from .auth_store import AuthConfigStore
from .deployment_reconciler import DeploymentReconciler
from .issuer import Issuers
from .kube import KubeApi, KubeError, load_connection
from .scheduling import DueSchedule, ObjectKey
from .serving import ServingReconciler
from .settings import OperatorSettings

log = logging.getLogger(__name__)

APIKEY = "ApiKey"
DEPLOYMENT = "DeepSeekDeployment"
MAX_BACKOFF = 30.0


class OperatorRuntime:
    def __init__(self, settings: OperatorSettings, kube: KubeApi) -> None:
        self.settings = settings
        self.kube = kube
        self.auth_store = AuthConfigStore(kube)
        self.issuers = Issuers(kube, self.auth_store, settings)
        self.apikeys = ApiKeyReconciler(kube, self.issuers, self.auth_store, settings)
        serving = ServingReconciler(kube, self.issuers,
                                    allowed_host_path_prefixes=settings.allowed_host_path_prefixes)
        self.deployments = DeploymentReconciler(kube, self.issuers, serving=serving,
                                                conflict_recheck=settings.retry_interval)
        self.schedule = DueSchedule()
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="reconcile")
        self.issuance_executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="issue")
        self.apikey_executor = ThreadPoolExecutor(max_workers=max(2, settings.workers // 2),
                                                  thread_name_prefix="apikey")
        # Issuances of one deployment running at once: the rest of the issuance pool stays free for others.
        self.issuance_per_deployment = max(1, settings.workers - max(1, settings.workers // 4))
        self._issuance_slots: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._failures: dict[ObjectKey, int] = {}
        self._apikeys_reconciled: set[tuple[str, str]] = set()
        # Reconciles run, by kind ("ApiKey", "ApiKey first issuance", ...): on the liveness endpoint's probes.
        self.reconciles: Counter[str] = Counter()

    @classmethod
    def connect(cls, settings: OperatorSettings) -> OperatorRuntime:
        # Enough connections for every pool's workers, so that maintenance never waits for an issuance's socket.
        return cls(settings, KubeApi(load_connection(settings.kubeconfig), max_connections=3 * settings.workers + 8))

    def close(self) -> None:
        for executor in (self.executor, self.issuance_executor, self.apikey_executor):
            executor.shutdown(wait=False, cancel_futures=True)
        self.kube.close()

    async def _blocking(self, fn: Any, *args: Any, executor: ThreadPoolExecutor | None = None) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor or self.executor, fn, *args)

    def _failed(self, key: ObjectKey, exc: BaseException) -> None:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        delay = min(MAX_BACKOFF, self.settings.retry_interval * 2 ** (count - 1) / 4)
        # KubeError carries the API's status line only; never a request body (which may hold a token).
        if isinstance(exc, KubeError):
            log.warning("reconcile of %s %s/%s failed (%s); retrying in %.1fs", key.kind, key.namespace, key.name,
                        exc, delay)
        else:
            log.exception("reconcile of %s %s/%s failed; retrying in %.1fs", key.kind, key.namespace, key.name,
                          delay)
        self.schedule.set(key, time.time() + delay)

    def apikey_known(self, namespace: str, name: str) -> bool:
        """Whether this process has reconciled the key since it started (a re-listing need not resume it)."""
        return (namespace, name) in self._apikeys_reconciled

    async def reconcile_apikey(self, namespace: str, name: str, observed: dict[str, Any] | None = None) -> None:
        """Reconcile one ApiKey, from `observed` (the watch event's object) when given, in the pool its work
        belongs to: first issuance, or everything else."""
        key = ObjectKey(APIKEY, namespace, name)
        started = time.monotonic()
        try:
            if observed is not None and first_issuance(observed):
                deployment = str(((observed.get("spec") or {}).get("deploymentRef") or {}).get("name"))
                slots = self._issuance_slots.get((namespace, deployment))
                if slots is None:
                    slots = self._issuance_slots[(namespace, deployment)] = asyncio.Semaphore(
                        self.issuance_per_deployment)
                async with slots:
                    self.reconciles[f"{APIKEY} first issuance"] += 1
                    result = await self._blocking(self.apikeys.reconcile, namespace, name, observed,
                                                  executor=self.issuance_executor)
            else:
                self.reconciles[APIKEY] += 1
                result = await self._blocking(self.apikeys.reconcile, namespace, name, observed,
                                              executor=self.apikey_executor)
        except Exception as exc:
            self._failed(key, exc)
            return
        log.debug("reconciled ApiKey %s/%s in %.0f ms", namespace, name, (time.monotonic() - started) * 1000)
        self._apikeys_reconciled.add((namespace, name))
        self._failures.pop(key, None)
        if result.next_due is None:
            self.schedule.forget(key)
        else:
            self.schedule.set(key, result.next_due, group=(APIKEY, namespace, result.deployment))

    def forget_apikey(self, namespace: str, name: str) -> None:
        """The key is gone: drop its schedule entry and lock."""
        self.schedule.forget(ObjectKey(APIKEY, namespace, name))
        self.apikeys.forget(namespace, name)
        self._apikeys_reconciled.discard((namespace, name))

    async def reconcile_deployment(self, namespace: str, name: str, *, wake_keys: bool = False) -> None:
        key = ObjectKey(DEPLOYMENT, namespace, name)
        self.reconciles[DEPLOYMENT] += 1
        try:
            result = await self._blocking(self.deployments.reconcile, namespace, name)
        except Exception as exc:
            self._failed(key, exc)
            return
        self._failures.pop(key, None)
        if result.next_due is None:
            self.schedule.forget(key)
            return
        self.schedule.set(key, result.next_due)
        if wake_keys or result.wake_keys:
            woken = self.schedule.wake_group((APIKEY, namespace, name), time.time())
            if woken:
                log.info("deployment %s/%s changed its issuer: re-checking %d key(s)", namespace, name, woken)

    async def dispatch(self, key: ObjectKey) -> None:
        """Run the reconcile a schedule entry asks for."""
        if key.kind == APIKEY:
            await self.reconcile_apikey(key.namespace, key.name)
        elif key.kind == DEPLOYMENT:
            await self.reconcile_deployment(key.namespace, key.name)
