"""Our kopf settings, fixed on day one: finalizer and annotation names under deepseek.ai, quiet kopf events."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf

from .kube import LIST_PAGE_SIZE
from .names import FIELD_MANAGER
from .rollout import ABORT_ANNOTATION, PROMOTE_ANNOTATION, RETRY_ANNOTATION
from .settings import OperatorSettings

KOPF_FINALIZER = "deepseek.ai/kopf-finalizer"
EVENT_WORKER_IDLE_TIMEOUT = 1.0
# Kinds with watch-event handlers only (handlers/apikey.py): kopf's create/update/delete detection, which the diff base
# serves, never runs for them.
WATCH_ONLY_KINDS = frozenset({"ApiKey"})
# Annotations under deepseek.ai that users set to steer a rollout. kopf leaves every annotation under its storage
# prefix out of an object's essence (the diff base drops a prefix that carries a kopf marker, ours
# `deepseek.ai/kopf-managed`; the progress storage clears the whole prefix), so without putting these back a promote,
# abort or retry fired no update handler and waited for the next periodic look (up to 30 s).
ROLLOUT_ANNOTATIONS = (PROMOTE_ANNOTATION, ABORT_ANNOTATION, RETRY_ANNOTATION)


def _with_rollout_annotations(essence: Any, source: Any) -> Any:
    """`essence` with the rollout annotations `source` (a body or an essence) carries put back."""
    annotations = ((source.get("metadata") or {}).get("annotations") or {}) if source is not None else {}
    steering = {name: annotations[name] for name in ROLLOUT_ANNOTATIONS if name in annotations}
    if steering and essence is not None:
        essence.setdefault("metadata", {}).setdefault("annotations", {}).update(steering)
    return essence


class DiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff base, skipped for kinds whose handlers are all watch-event handlers.

    kopf builds an object's essence (a deep copy less system fields) and reads the stored one for every watch event of
    every resource, and diffs the two; only create/update handlers and daemons use the result. Without this, each
    event of an ApiKey (a burst of a thousand new keys is two thousand events) paid for a diff nothing reads."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> Any:
        if body.get("kind") in WATCH_ONLY_KINDS:
            return None
        return _with_rollout_annotations(super().build(body=body, extra_fields=extra_fields), body)

    def fetch(self, *, body: kopf.Body) -> Any:
        if body.get("kind") in WATCH_ONLY_KINDS:
            return None
        return super().fetch(body=body)


class ProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's annotation progress storage, whose clearing of the essence keeps the rollout annotations."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return _with_rollout_annotations(super().clear(essence=essence), essence)


def build_kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    kopf_settings = kopf.OperatorSettings()
    # The ApiKey finalizer (names.FINALIZER) is managed by the ApiKey reconcile itself; kopf's own finalizer name
    # must differ, or kopf would strip ours from objects it has no deletion handlers for.
    kopf_settings.persistence.finalizer = KOPF_FINALIZER
    kopf_settings.persistence.progress_storage = ProgressStorage(prefix="deepseek.ai")
    kopf_settings.persistence.diffbase_storage = DiffBaseStorage(prefix="deepseek.ai", key="last-handled-configuration")
    # Our own Events (Issued, Rotated, Revoked) say what happened; kopf only reports its own trouble.
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.posting.reporting_component = FIELD_MANAGER
    kopf_settings.execution.max_workers = settings.workers
    # No watch of the CRDs (nor the RBAC for it): the process waits for them before kopf starts and stops kopf when
    # they go (__main__.run_kopf).
    kopf_settings.scanning.disabled = True
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.connect_timeout = 10
    # The start-up listing in pages (ten thousand ApiKeys are not one response decoded at once), and an object's
    # event worker ends 1 s after its last event instead of kopf's 5 s: after a restart every listed key has one,
    # and ten thousand of them alive at once left a high-water mark in the heap that stayed (bench/apikeys_at_rest.py:
    # RSS at rest 343 MiB after re-verifying 10,000 keys, 212 MiB with these and the listed keys queued in runtime.py).
    kopf_settings.watching.chunk_size = LIST_PAGE_SIZE
    kopf_settings.queueing.idle_timeout = EVENT_WORKER_IDLE_TIMEOUT
    kopf_settings.networking.request_timeout = 60
    # After patching its annotations kopf waits this long for the patched version to come back through the watch;
    # past it, kopf handles the older version it has and runs the create or update handler a second time (which
    # wakes every ApiKey of a deployment). A busy API server takes longer than kopf's 5 s default.
    kopf_settings.persistence.consistency_timeout = 30
    return kopf_settings
