"""Everything one running operator holds: the API client, caches, reconcilers, the schedule, worker pools.

Kopf handlers and the schedule loop both go through `OperatorRuntime`, which runs the (blocking) reconciles in
worker pools and decides when each object comes back. Three pools, so that no kind of work queues behind another:
first issuance of new ApiKeys (a burst of thousands), every other ApiKey reconcile (revocation, rotation, deletion,
drift), and DeepSeekDeployments (rollouts, which block on verification). Within first issuance one deployment's
keys never hold every worker, so a new key of another deployment starts at once.

New keys waiting for an issuance worker wait as one entry each in a per-deployment queue (the key's object, nothing
else), not as a suspended watch-event handler: a burst of ten thousand keys would otherwise hold ten thousand handlers
with their events, wrappers and copies at once, a high-water mark Python's allocator keeps long after the burst.
Likewise the keys of the start-up listing, all of them at once after a restart, wait for their re-verification in one
queue of their own, worked by the ApiKey pool's threads.

A first issuance writes the key's Secret and returns; the key's status (Ready, token id) is written from a queue by
a few status workers of their own (`STATUS_WRITERS`), once no new key waits for issuance or at most `STATUS_MAX_WAIT`
after its Secret (`status_write_delay`). Past that, issuance workers write overdue statuses before their next key, so
that in a long stream the statuses keep pace; and issuance workers with no new key left help with the rest. In a
burst the API server's and this process's time then goes first to what a workload waits for (the token in the
Secret), one write per key. Until its status is written, a key's later watch events wait, as they wait for a running
issuance.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any

from .apikey_reconciler import ApiKeyReconciler, ReconcileResult, StatusWrite, first_issuance, without_tokens
from .apikey_secret_watch import ApiKeySecretWatch
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
# Workers that write first issuances' deferred statuses (see the module docstring): few, so that in a burst the
# issuance workers' Secret writes come first; enough that a thousand statuses follow within seconds.
STATUS_WRITERS = 2
# While new keys wait for issuance, a deferred status waits too, but never longer than this after its Secret.
STATUS_MAX_WAIT = 10.0
# A Secret watch event not known as the operator's own is looked at again this much later before its key is
# reconciled: the event of a write can arrive just before the writing reconcile has recorded its resourceVersion.
SECRET_EVENT_SETTLE = 1.0
# A deleted Secret waits longer: when its key or namespace is being deleted, the key's own deletion event (which
# makes the Secret's deletion expected) arrives meanwhile.
SECRET_DELETION_SETTLE = 3.0
# How long reconciles from the start-up listing wait for the Secret watch's first listing (which spares them the
# read of each Secret) before reading Secrets one by one.
SECRET_WATCH_START_WAIT = 60.0


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
        self.apikey_workers = max(2, settings.workers // 2)
        self.apikey_executor = ThreadPoolExecutor(max_workers=self.apikey_workers, thread_name_prefix="apikey")
        # Issuances of one deployment running at once: the rest of the issuance pool stays free for others.
        self.issuance_per_deployment = max(1, settings.workers - max(1, settings.workers // 4))
        self.pending_issuances = PendingIssuances()
        self.status_executor = ThreadPoolExecutor(max_workers=STATUS_WRITERS, thread_name_prefix="status")
        # First issuances whose statuses are still to be written, oldest first, with their keys' `_issuing` events.
        self._status_writes: deque[tuple[float, str, str, StatusWrite, asyncio.Event]] = deque()
        self._status_writers = 0
        self._issuance_drainers: Counter[tuple[str, str]] = Counter()  # (namespace, deployment) -> running drainers
        self._issuance_tasks: set[asyncio.Task[None]] = set()
        # Keys of the start-up listing waiting for their re-verification, oldest first (the key's object, nothing
        # else), and the workers taking them; a later event of a queued key takes it off the queue.
        self._pending_resumes: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._resume_drainers = 0
        # First issuances running now, each with what its key's later events wait for (see `issuance_finished`).
        self._issuing: dict[tuple[str, str], asyncio.Event] = {}
        self._failures: dict[ObjectKey, int] = {}
        # Work handed to the pools and not finished (queued or running): what a stop waits for (wait_for_workers).
        self._running: set[Future[Any]] = set()
        self._running_lock = threading.Lock()
        self._apikeys_reconciled: set[tuple[str, str]] = set()
        # Reconciles run, by kind ("ApiKey", "ApiKey first issuance", ...): on the liveness endpoint's probes.
        self.reconciles: Counter[str] = Counter()
        self.secret_watch = ApiKeySecretWatch(kube, None if settings.all_namespaces else settings.namespaces,
                                              self._secret_event)
        self.apikeys.secret_watch = self.secret_watch
        self._loop: asyncio.AbstractEventLoop | None = None
        # kopf's event loop, kept after `close` too: what a kopf that does not stop waits for is read from it.
        self.kopf_loop: asyncio.AbstractEventLoop | None = None
        self._secret_checks: set[tuple[str, str]] = set()
        self._secret_check_tasks: set[asyncio.Task[None]] = set()
        # Keys being deleted: their Secrets go with them (finalizer, namespace deletion), which wakes nothing.
        self._apikeys_deleting: set[tuple[str, str]] = set()

    @classmethod
    def connect(cls, settings: OperatorSettings) -> OperatorRuntime:
        # Enough connections for every pool's workers, so that maintenance never waits for an issuance's socket.
        return cls(settings, KubeApi(load_connection(settings.kubeconfig), max_connections=3 * settings.workers + 8))

    def start_secret_watch(self) -> None:
        """Start the ApiKey Secret watch; its events reach this (running) event loop."""
        self._loop = self.kopf_loop = asyncio.get_running_loop()
        self.secret_watch.start()

    def _secret_event(self, namespace: str, name: str, secret_name: str, resource_version: str | None) -> None:
        # In the watch's thread.
        if self._loop is None or self.apikeys.secret_version_known(namespace, name, secret_name, resource_version):
            return
        self._loop.call_soon_threadsafe(self._secret_changed, namespace, name, secret_name, resource_version is None)

    def _secret_changed(self, namespace: str, name: str, secret_name: str, deleted: bool) -> None:
        if (namespace, name) in self._secret_checks:
            return
        self._secret_checks.add((namespace, name))
        asyncio.get_running_loop().call_later(SECRET_DELETION_SETTLE if deleted else SECRET_EVENT_SETTLE,
                                              self._start_secret_check, namespace, name, secret_name)

    def _start_secret_check(self, namespace: str, name: str, secret_name: str) -> None:
        task = asyncio.ensure_future(self._check_secret(namespace, name, secret_name))
        self._secret_check_tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._secret_check_tasks.discard)

    async def _check_secret(self, namespace: str, name: str, secret_name: str) -> None:
        """A key's Secret changed without this operator writing it (edited, deleted): reconcile the key now."""
        self._secret_checks.discard((namespace, name))
        if self._loop is None:  # closed: kopf is stopping
            return
        if not self.apikey_known(namespace, name) or (namespace, name) in self._apikeys_deleting:
            # Gone, going, or not reconciled yet by this process (its start-up reconcile reads the Secret anyway).
            return
        seen = self.secret_watch.lookup(namespace, secret_name)
        if self.apikeys.secret_version_known(namespace, name, secret_name, seen.resource_version if seen else None):
            return
        log.info("Secret %s/%s of ApiKey %s changed or was deleted by someone else: reconciling the key", namespace,
                 secret_name, name)
        await self.reconcile_apikey(namespace, name)

    async def _secret_watch_settled(self) -> None:
        deadline = time.monotonic() + SECRET_WATCH_START_WAIT
        while not self.secret_watch.settled and self._loop is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def close(self) -> None:
        self.secret_watch.stop()
        self._loop = None  # a watch event still on its way goes nowhere: this loop is about to close
        # Queued first issuances resume from the next start's listing; a key whose status was not written yet is
        # reconciled then too (its observedGeneration is missing), and adopts the token in its Secret.
        for task in list(self._issuance_tasks):
            task.cancel()
        self.stop_workers()
        self.kube.close()

    def stop_workers(self) -> None:
        """Start no more reconciles: queued ones are dropped, idle worker threads end, running ones go on to their
        end (a stop waits a little for them: __main__.run_kopf). Safe to call again."""
        for executor in (self.executor, self.issuance_executor, self.apikey_executor, self.status_executor):
            executor.shutdown(wait=False, cancel_futures=True)

    async def _blocking(self, fn: Any, *args: Any, executor: ThreadPoolExecutor | None = None) -> Any:
        future = (executor or self.executor).submit(fn, *args)
        with self._running_lock:
            self._running.add(future)
        future.add_done_callback(self._work_done)
        return await asyncio.wrap_future(future)

    def _work_done(self, future: Future[Any]) -> None:
        with self._running_lock:
            self._running.discard(future)

    def wait_for_workers(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the reconciles running in the worker pools to end (after
        `stop_workers`); how many still run then."""
        with self._running_lock:
            running = list(self._running)
        return len(wait(running, timeout).not_done)

    def _failed(self, key: ObjectKey, exc: BaseException) -> None:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        delay = min(MAX_BACKOFF, self.settings.retry_interval * 2 ** (count - 1) / 4)
        # KubeError carries the API's message, not the request body; a webhook or proxy could still echo the body
        # (a Secret with a token) into it, so tokens are taken out.
        if isinstance(exc, KubeError):
            log.warning("reconcile of %s %s/%s failed (%s); retrying in %.1fs", key.kind, key.namespace, key.name,
                        without_tokens(str(exc)), delay)
        else:
            log.exception("reconcile of %s %s/%s failed; retrying in %.1fs", key.kind, key.namespace, key.name,
                          delay)
        self.schedule.set(key, time.time() + delay)

    def apikey_known(self, namespace: str, name: str) -> bool:
        """Whether this process has reconciled the key since it started (a re-listing need not resume it)."""
        return (namespace, name) in self._apikeys_reconciled

    async def reconcile_apikey(self, namespace: str, name: str, observed: dict[str, Any] | None = None, *,
                               resume: bool = False) -> None:
        """Reconcile one ApiKey, from `observed` (the watch event's object) when given, in the pool its work
        belongs to. A first issuance is queued for its deployment's issuance workers, and a key of the start-up
        listing (`resume`) for the ApiKey pool's, and this returns at once; anything else runs now (and supersedes
        the key's queued reconcile)."""
        if observed is not None and first_issuance(observed):
            deployment = str(((observed.get("spec") or {}).get("deploymentRef") or {}).get("name"))
            self._pending_resumes.pop((namespace, name), None)  # one queue at a time holds a key
            self.pending_issuances.put(namespace, deployment, name, observed)
            group = (namespace, deployment)
            if self._issuance_drainers[group] < self.issuance_per_deployment:
                self._issuance_drainers[group] += 1
                self._start_worker(self._drain_issuances(namespace, deployment))
            return
        self.pending_issuances.discard(namespace, name)
        if resume and observed is not None:
            # Thousands of keys arrive at once in the listing: each waits here as its object alone, not as a
            # suspended watch handler holding kopf's per-event state, whose high-water mark would stay.
            self._pending_resumes[(namespace, name)] = observed
            if self._resume_drainers < self.apikey_workers:
                self._resume_drainers += 1
                self._start_worker(self._drain_resumes())
            return
        self._pending_resumes.pop((namespace, name), None)
        if observed is not None and not self.secret_watch.settled:
            await self._secret_watch_settled()
        self.reconciles[APIKEY] += 1
        await self._run_apikey(namespace, name, observed, self.apikey_executor)

    def _start_worker(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one queue worker (issuance, start-up listing, statuses), held until done (the loop keeps only weak
        references to tasks) and cancelled by `close`."""
        task = asyncio.ensure_future(work)
        self._issuance_tasks.add(task)
        task.add_done_callback(self._issuance_tasks.discard)

    async def _drain_issuances(self, namespace: str, deployment: str) -> None:
        """One issuance worker of a deployment: first issuances from its queue, oldest first, until it is empty."""
        try:
            while True:
                overdue = self._overdue_status_write()
                if overdue is not None:  # statuses fall no further behind than STATUS_MAX_WAIT
                    await self._write_deferred_status(*overdue, self.issuance_executor)
                    continue
                item = self.pending_issuances.pop(namespace, deployment)
                if item is None:
                    if not len(self.pending_issuances) and self._status_writes:  # idle: help with the statuses
                        _, *queued = self._status_writes.popleft()
                        await self._write_deferred_status(*queued, self.issuance_executor)
                        continue
                    break
                name, observed = item
                self.reconciles[f"{APIKEY} first issuance"] += 1
                finished = self._issuing[(namespace, name)] = asyncio.Event()
                status_write = None
                try:
                    result = await self._run_apikey(namespace, name, observed, self.issuance_executor,
                                                    defer_status=True)
                    status_write = result.status_write if result is not None else None
                finally:
                    if status_write is None:
                        del self._issuing[(namespace, name)]
                        finished.set()
                if status_write is not None:
                    self._queue_status_write(namespace, name, status_write, finished)
        finally:
            self._issuance_drainers[(namespace, deployment)] -= 1
            if self._issuance_drainers[(namespace, deployment)] <= 0:
                del self._issuance_drainers[(namespace, deployment)]

    async def _drain_resumes(self) -> None:
        """One worker of the start-up listing's keys: each reconciled from its listed object, oldest first, once the
        Secret watch has listed their Secrets (a key whose Secret is at the version its status recorded is not
        read). The key's later events wait for its reconcile, as for a first issuance."""
        try:
            if not self.secret_watch.settled:
                await self._secret_watch_settled()
            while self._pending_resumes:
                (namespace, name), observed = self._pending_resumes.popitem(last=False)
                self.reconciles[APIKEY] += 1
                finished = self._issuing[(namespace, name)] = asyncio.Event()
                try:
                    await self._run_apikey(namespace, name, observed, self.apikey_executor)
                finally:
                    del self._issuing[(namespace, name)]
                    finished.set()
        finally:
            self._resume_drainers -= 1

    def _queue_status_write(self, namespace: str, name: str, write: StatusWrite, finished: asyncio.Event) -> None:
        self._status_writes.append((time.monotonic(), namespace, name, write, finished))
        if self._status_writers < STATUS_WRITERS:
            self._status_writers += 1
            self._start_worker(self._drain_status_writes())

    def _overdue_status_write(self) -> tuple[str, str, StatusWrite, asyncio.Event] | None:
        """The oldest deferred status when it has waited STATUS_MAX_WAIT (taken off the queue), else None. Issuance
        workers write it before their next new key: in a stream of new keys longer than a burst, the statuses then
        keep pace with the Secrets instead of piling up behind the status workers."""
        # As if new keys waited: due only once its STATUS_MAX_WAIT is up.
        if not self._status_writes or status_write_delay(self._status_writes[0][0], time.monotonic(), 1) > 0:
            return None
        _, namespace, name, write, finished = self._status_writes.popleft()
        return namespace, name, write, finished

    async def _drain_status_writes(self) -> None:
        """One status worker: deferred statuses of first issuances, oldest first, until none is left."""
        try:
            while self._status_writes:
                delay = status_write_delay(self._status_writes[0][0], time.monotonic(), len(self.pending_issuances))
                if delay > 0:  # looked at again soon: the issuance queue may empty before
                    await asyncio.sleep(min(0.05, delay))
                    continue
                _, namespace, name, write, finished = self._status_writes.popleft()
                await self._write_deferred_status(namespace, name, write, finished, self.status_executor)
        finally:
            self._status_writers -= 1

    async def _write_deferred_status(self, namespace: str, name: str, write: StatusWrite, finished: asyncio.Event,
                                     executor: ThreadPoolExecutor) -> None:
        """Write one deferred status; a write that fails is retried as a whole reconcile (which reads the key and its
        Secret and adopts the token). Then the key's waiting events go on."""
        key = ObjectKey(APIKEY, namespace, name)
        try:
            result = await self._blocking(self.apikeys.write_status, namespace, name, write, executor=executor)
        except Exception as exc:
            self._failed(key, exc)
        else:
            if result is not None:  # the key had changed: it was reconciled afresh
                self.reconciles[APIKEY] += 1
                self._reconciled(key, result)
        finally:
            del self._issuing[(namespace, name)]
            finished.set()

    async def issuance_finished(self, namespace: str, name: str) -> None:
        """Return once no queued reconcile of the key (a first issuance, or one of the start-up listing) is running.
        A watch event of the key waits for it: the events of that reconcile's own writes are recognised (by
        resourceVersion) only once it has recorded them, and any other change is then judged against what it did."""
        finished = self._issuing.get((namespace, name))
        if finished is not None:
            await finished.wait()

    async def _run_apikey(self, namespace: str, name: str, observed: dict[str, Any] | None,
                          executor: ThreadPoolExecutor, *, defer_status: bool = False) -> ReconcileResult | None:
        """Reconcile the key in `executor` and schedule its next look; None when the reconcile failed (retried)."""
        key = ObjectKey(APIKEY, namespace, name)
        started = time.monotonic()
        try:
            result: ReconcileResult = await self._blocking(
                partial(self.apikeys.reconcile, namespace, name, observed, defer_status=defer_status),
                executor=executor)
        except Exception as exc:
            self._failed(key, exc)
            return None
        log.debug("reconciled ApiKey %s/%s in %.0f ms", namespace, name, (time.monotonic() - started) * 1000)
        self._reconciled(key, result)
        return result

    def _reconciled(self, key: ObjectKey, result: ReconcileResult) -> None:
        self._apikeys_reconciled.add((key.namespace, key.name))
        self._failures.pop(key, None)
        if result.next_due is None:
            self.schedule.forget(key)
        else:
            self.schedule.set(key, result.next_due, group=(APIKEY, key.namespace, result.deployment))

    def apikey_deleting(self, namespace: str, name: str) -> None:
        """The key has a deletionTimestamp: a change of its Secret from now on wakes nothing."""
        self._apikeys_deleting.add((namespace, name))

    def forget_apikey(self, namespace: str, name: str) -> None:
        """The key is gone: drop its schedule entry and lock."""
        self._apikeys_deleting.discard((namespace, name))
        self.pending_issuances.discard(namespace, name)
        self._pending_resumes.pop((namespace, name), None)
        self.schedule.forget(ObjectKey(APIKEY, namespace, name))
        self.apikeys.forget(namespace, name)
        self._apikeys_reconciled.discard((namespace, name))

    async def reconcile_deployment(self, namespace: str, name: str, *, wake_keys: bool = False,
                                   wake_waiting_keys: bool = False) -> None:
        """Reconcile a deployment; then wake all its keys (`wake_keys`, or when its issuer changed), or only those
        whose last reconcile left them not Ready (`wake_waiting_keys`: e.g. waiting for the deployment to exist)."""
        key = ObjectKey(DEPLOYMENT, namespace, name)
        self.reconciles[DEPLOYMENT] += 1
        auth_unknown = self.auth_store.problem(namespace, name) is not None
        try:
            result = await self._blocking(self.deployments.reconcile, namespace, name)
        except Exception as exc:
            self._failed(key, exc)
            self._wake_keys_if_auth_flipped(namespace, name, auth_unknown)
            return
        self._wake_keys_if_auth_flipped(namespace, name, auth_unknown)
        self._failures.pop(key, None)
        if result.next_due is None:
            self.schedule.forget(key)
            return
        self.schedule.set(key, result.next_due)
        if wake_keys or result.wake_keys:
            woken = self.schedule.wake_group((APIKEY, namespace, name), time.time())
            if woken:
                log.info("deployment %s/%s changed its issuer: re-checking %d key(s)", namespace, name, woken)
        elif wake_waiting_keys or result.wake_waiting_keys:
            now = time.time()
            for key_name in self.apikeys.waiting_keys(namespace, name):
                self.schedule.set(ObjectKey(APIKEY, namespace, key_name), now, group=(APIKEY, namespace, name))

    def deployment_deleted(self, namespace: str, name: str) -> None:
        """The deployment is gone: its keys say so (DeploymentNotFound) now, not at their next check hours away."""
        woken = self.schedule.wake_group((APIKEY, namespace, name), time.time())
        if woken:
            log.info("deployment %s/%s was deleted: re-checking %d key(s)", namespace, name, woken)

    def _wake_keys_if_auth_flipped(self, namespace: str, name: str, unknown_before: bool) -> None:
        # Keys are no longer looked at on a short timer: when the auth ConfigMap became unreadable (or readable
        # again), they say so in their status (AuthConfigUnknown) only if woken.
        if (self.auth_store.problem(namespace, name) is not None) != unknown_before:
            woken = self.schedule.wake_group((APIKEY, namespace, name), time.time())
            if woken:
                log.info("auth ConfigMap of deployment %s/%s became %s: re-checking %d key(s)", namespace, name,
                         "unknown" if not unknown_before else "known", woken)

    async def dispatch(self, key: ObjectKey) -> None:
        """Run the reconcile a schedule entry asks for."""
        if key.kind == APIKEY:
            await self.reconcile_apikey(key.namespace, key.name)
        elif key.kind == DEPLOYMENT:
            await self.reconcile_deployment(key.namespace, key.name)


def status_write_delay(queued_at: float, now: float, issuances_waiting: int,
                       max_wait: float = STATUS_MAX_WAIT) -> float:
    """Seconds until a deferred status queued at `queued_at` may be written (pure): none while no new key waits for
    issuance; otherwise what is left of `max_wait`, so that a stream of new keys delays statuses but never stops
    them."""
    if not issuances_waiting:
        return 0.0
    return max(0.0, max_wait - (now - queued_at))


class PendingIssuances:
    """New keys waiting for a first issuance, per (namespace, deployment), oldest first: one entry per key, holding
    the newest observed object (a later event of a queued key replaces its object and keeps its place)."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, str], OrderedDict[str, dict[str, Any]]] = {}
        self._deployment_of: dict[tuple[str, str], str] = {}

    def __len__(self) -> int:
        return len(self._deployment_of)

    def put(self, namespace: str, deployment: str, name: str, observed: dict[str, Any]) -> None:
        previous = self._deployment_of.get((namespace, name))
        if previous is not None and previous != deployment:  # the key now names another deployment
            self.discard(namespace, name)
        self._queues.setdefault((namespace, deployment), OrderedDict())[name] = observed
        self._deployment_of[(namespace, name)] = deployment

    def pop(self, namespace: str, deployment: str) -> tuple[str, dict[str, Any]] | None:
        queue = self._queues.get((namespace, deployment))
        if not queue:
            return None
        name, observed = queue.popitem(last=False)
        if not queue:
            del self._queues[(namespace, deployment)]
        del self._deployment_of[(namespace, name)]
        return name, observed

    def discard(self, namespace: str, name: str) -> None:
        deployment = self._deployment_of.pop((namespace, name), None)
        if deployment is None:
            return
        queue = self._queues[(namespace, deployment)]
        queue.pop(name, None)
        if not queue:
            del self._queues[(namespace, deployment)]
