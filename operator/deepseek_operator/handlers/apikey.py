"""ApiKey handler: watch events that ask for it run the one idempotent reconcile (which also finalizes).

Raw events filtered on `metadata.generation` vs `status.observedGeneration` rather than kopf's on.create/on.update
and on.delete: those make kopf patch a finalizer and a last-handled-configuration annotation onto every key and
diff every event, which with a thousand new keys is most of the operator's CPU. The reconcile adds and removes its
own finalizer (`deepseek.ai/finalizer`), so deletion still waits until every token is revoked.
"""

from __future__ import annotations

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


def register(registry: kopf.OperatorRegistry, runtime: OperatorRuntime) -> None:
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def apikey_event(type: str | None, body: kopf.Body, namespace: str | None, name: str | None,
                           **_: Any) -> None:
        if type == "DELETED":
            runtime.forget_apikey(str(namespace), str(name))
        elif needs_reconcile(type, body):
            await runtime.reconcile_apikey(str(namespace), str(name))
