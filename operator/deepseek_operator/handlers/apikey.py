"""ApiKey handler: watch events that ask for it run the one idempotent reconcile (which also finalizes).

Raw events filtered on `metadata.generation` vs `status.observedGeneration` rather than kopf's on.create/on.update
and on.delete: those make kopf patch a finalizer and a last-handled-configuration annotation onto every key and
diff every event, which with a thousand new keys is most of the operator's CPU. The reconcile adds and removes its
own finalizer (`deepseek.ai/finalizer`), so deletion still waits until every token is revoked.

The reconcile starts from the event's object (no GET), and the events of the reconcile's own writes (its finalizer
patch: no observedGeneration yet) are recognised by resourceVersion and skipped, so a new key is reconciled once.
A new key's first issuance is queued per deployment and the handler returns (runtime.py); an event of a key whose
issuance is running waits for it, as kopf would make it wait for a handler still running.
A re-listing after a watch restart resumes only the keys this process has not reconciled yet; the others are
judged like any change.

Their Secrets are watched too, metadata only (apikey_secret_watch.py): a Secret someone else edits or deletes
wakes its key, and a key of the start-up listing whose Secret is at the version its status recorded is not read.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import kopf

from ..apikey_plan import rotation_request
from ..names import FINALIZER, GROUP, VERSION
from ..runtime import OperatorRuntime

PLURAL = "apikeys"


def needs_reconcile(event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Whether a watch event asks for a reconcile (pure); status-only changes (our own writes) do not, a new value
    of the rotate annotation (which changes no generation) does."""
    if event_type == "DELETED":
        return False
    if event_type is None:  # the initial listing after a start: resume every key (due times live in status)
        return True
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    finalizers = meta.get("finalizers") or []
    if meta.get("deletionTimestamp"):
        return FINALIZER in finalizers
    return (FINALIZER not in finalizers or status.get("observedGeneration") != meta.get("generation")
            or "pendingToken" in status or rotation_request(body) is not None)


def observed_copy(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a watch event's object for a reconcile (pure): everything but `metadata.managedFields`, which no
    reconcile reads and which is often most of the object (a queued key keeps only what it needs)."""
    copied = {key: copy.deepcopy(value) for key, value in body.items() if key != "metadata"}
    copied["metadata"] = {key: copy.deepcopy(value) for key, value in (body.get("metadata") or {}).items()
                          if key != "managedFields"}
    return copied


def register(registry: kopf.OperatorRegistry, runtime: OperatorRuntime) -> None:
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def apikey_event(type: str | None, body: kopf.Body, namespace: str | None, name: str | None,
                           **_: Any) -> None:
        namespace, name = str(namespace), str(name)
        await runtime.issuance_finished(namespace, name)
        if type == "DELETED":
            runtime.forget_apikey(namespace, name)
            return
        if body.get("metadata", {}).get("deletionTimestamp"):
            runtime.apikey_deleting(namespace, name)
        if type is None and runtime.apikey_known(namespace, name):
            type = "MODIFIED"
        if not needs_reconcile(type, body):
            return
        if runtime.apikeys.caused_by_own_write(namespace, name, body.get("metadata", {}).get("resourceVersion")):
            return
        await runtime.reconcile_apikey(namespace, name, observed_copy(body), resume=type is None)

    @kopf.on.startup(registry=registry)
    async def start_secret_watch(**_: Any) -> None:
        runtime.start_secret_watch()

    @kopf.on.event(GROUP, VERSION, "deepseekdeployments", registry=registry)
    async def deployment_seen(type: str | None, body: kopf.Body, **_: Any) -> None:
        # ApiKey reconciles read their deployment from here instead of GETting it (deletion: see deployment.py).
        if type != "DELETED":
            runtime.issuers.observe_deployment(copy.deepcopy(dict(body)))

    # Counters on the liveness endpoint (JSON), for the burst benchmark and for a person checking the operator:
    # reconciles run by kind, and API requests sent by `VERB resource`.
    @kopf.on.probe(id="reconciles", registry=registry)
    def reconciles(**_: Any) -> dict[str, int]:
        return dict(runtime.reconciles)

    @kopf.on.probe(id="api_requests", registry=registry)
    def api_requests(**_: Any) -> dict[str, int]:
        return dict(runtime.kube.request_counts)

    @kopf.on.probe(id="api_requests_by_pool", registry=registry)
    def api_requests_by_pool(**_: Any) -> dict[str, int]:
        return dict(runtime.kube.request_counts_by_pool)

    @kopf.on.probe(id="apikey_secret_watch", registry=registry)
    def apikey_secret_watch(**_: Any) -> dict[str, Any]:
        watch = runtime.secret_watch
        return {"synced": watch.synced, "secrets": len(watch), "unavailable": watch.unavailable}

    @kopf.on.probe(id="api_request_seconds", registry=registry)
    def api_request_seconds(**_: Any) -> dict[str, float]:
        return {kind: round(seconds, 3) for kind, seconds in runtime.kube.request_seconds.items()}
