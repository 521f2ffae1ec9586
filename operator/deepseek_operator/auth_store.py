"""Writes the `<deployment>-auth` ConfigMap for many concurrent reconciles without losing any change.

Every change (a revocation, a key's limits, the issuer's JWKS) goes through `commit`, which queues it and lets one
thread per deployment write all queued changes in one resourceVersion-guarded update (group commit), re-reading
and re-applying on 409. `commit` returns only once the change is stored, so a caller may then forget it.

The ConfigMap never grows past the API server's 1 MiB cap (`auth_config.fit_changes`): over the new-entry budget a
commit that adds a new key's limits raises `AuthConfigFull` after storing the rest of its changes (revocations
always land), and the caller keeps that key waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .auth_config import (
    CONFIGMAP_LIMIT,
    NEW_ENTRY_BUDGET,
    AuthChange,
    AuthDocuments,
    build_auth_configmap,
    configmap_size,
    decode_documents,
    encode_documents,
    fit_changes,
)
from .kube import CONFIGMAPS, Conflict, KubeApi, KubeError, NotFound, ensure_controlled
from .names import auth_configmap_name, controller_uid, deployment_labels, owner_reference

log = logging.getLogger(__name__)


class AuthConfigFull(Exception):
    """Some of a commit's changes (new entries) were left out for lack of room; all its other changes were stored.

    (A batch that does not fit even without new entries stores nothing and raises KubeError 422 instead.)
    """


def _kib(size: int) -> str:
    return f"{size / 1024:.0f} KiB"


def full_message(configmap: str, size: int) -> str:
    """What a person reads when the auth ConfigMap has no room for new keys: how full, and what to do."""
    return (f"ConfigMap {configmap} holds {_kib(size)} of its {_kib(CONFIGMAP_LIMIT)} cap; past "
            f"{_kib(NEW_ENTRY_BUDGET)} new keys with their own rate limits (and new keys' first tokens) wait, while "
            "revocations and deletions still apply. Room comes back as revoked tokens expire; to make room sooner "
            "delete unused ApiKeys, shorten spec.duration of ApiKeys, or spread the keys over more deployments")


@dataclass
class _Request:
    changes: Sequence[AuthChange]
    done: threading.Event = field(default_factory=threading.Event)
    result: AuthDocuments | None = None
    error: BaseException | None = None


@dataclass
class _Slot:
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    queue_lock: threading.Lock = field(default_factory=threading.Lock)
    queue: list[_Request] = field(default_factory=list)
    documents: AuthDocuments | None = None
    resource_version: str | None = None
    owner_uid: str | None = None
    # Why the ConfigMap's content is not known as last read (missing, unreadable); None when it was read.
    problem: str | None = None
    # Bytes of data and binaryData as last read or written (what the API server counts against its cap).
    size: int | None = None


class AuthConfigStore:
    """Cached documents and serialized writes of every deployment's auth ConfigMap."""

    def __init__(self, kube: KubeApi, *, clock: Callable[[], float] = time.time, attempts: int = 20) -> None:
        self._kube = kube
        self._clock = clock
        self._attempts = attempts
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._slots_lock = threading.Lock()

    def _slot(self, namespace: str, deployment: str) -> _Slot:
        with self._slots_lock:
            return self._slots.setdefault((namespace, deployment), _Slot())

    def documents(self, namespace: str, deployment: str, *, refresh: bool = False) -> AuthDocuments | None:
        """The documents as last read or written (read from the API on first use); None while no ConfigMap."""
        slot = self._slot(namespace, deployment)
        with slot.write_lock:
            if refresh or slot.resource_version is None:
                self._load(slot, namespace, deployment)
            return slot.documents if slot.resource_version is not None else None

    def read(self, namespace: str, deployment: str, *, refresh: bool = False) -> tuple[AuthDocuments | None, str]:
        """(documents, "") when the ConfigMap was read as this operator writes it, else (None, why it is unknown).

        Decisions that act on what is published or revoked must not read a missing or unreadable ConfigMap as
        "nothing published".
        """
        slot = self._slot(namespace, deployment)
        with slot.write_lock:
            try:
                if refresh or slot.resource_version is None or slot.problem is not None:
                    self._load(slot, namespace, deployment)
            except KubeError as exc:
                return None, (f"ConfigMap {namespace}/{auth_configmap_name(deployment)} cannot be read "
                              f"({exc.status} {exc.reason})")
            if slot.problem is not None:
                return None, slot.problem
            return slot.documents, ""

    def usage(self, namespace: str, deployment: str) -> int | None:
        """The ConfigMap's size as last read or written (None before either); no API call."""
        return self._slot(namespace, deployment).size

    def new_keys_wait_reason(self, namespace: str, deployment: str) -> str:
        """"" while new keys fit, else why they wait (from the size last read or written)."""
        size = self.usage(namespace, deployment)
        if size is None or size <= NEW_ENTRY_BUDGET:
            return ""
        return full_message(f"{namespace}/{auth_configmap_name(deployment)}", size)

    def _load(self, slot: _Slot, namespace: str, deployment: str) -> None:
        name = auth_configmap_name(deployment)
        current = self._kube.get(CONFIGMAPS, namespace, name)
        if current is None:
            # Keep the documents last known: if someone deleted the ConfigMap, the next write recreates it with
            # every revocation this process knew of instead of an empty list.
            slot.resource_version, slot.owner_uid = None, None
            slot.problem = f"ConfigMap {namespace}/{name} does not exist"
            return
        controller = next((ref for ref in current["metadata"].get("ownerReferences") or [] if ref.get("controller")),
                          {})
        try:
            if (controller.get("kind"), controller.get("name")) != ("DeepSeekDeployment", deployment):
                # Someone else's ConfigMap of this name: its content is never read as (or carried into) ours.
                slot.problem = (f"ConfigMap {namespace}/{name} is not controlled by DeepSeekDeployment "
                                f"{namespace}/{deployment}")
            else:
                slot.documents = decode_documents(current.get("data"), current.get("binaryData"), complete=True)
                slot.problem = None
        except (ValueError, TypeError, AttributeError, OSError) as exc:
            # Keep the documents last known (a write repairs the ConfigMap from them) and say what is wrong.
            slot.problem = f"ConfigMap {namespace}/{name} cannot be read: {str(exc)[:200]}"
            log.warning("%s", slot.problem)
        slot.resource_version = current["metadata"]["resourceVersion"]
        slot.size = configmap_size(current.get("data") or {}, current.get("binaryData") or {})
        slot.owner_uid = controller_uid(current)

    def commit(
        self, namespace: str, deployment: str, changes: Sequence[AuthChange], *, owner: dict[str, Any]
    ) -> AuthDocuments:
        """Store `changes` (with everyone else's queued ones); `owner` is the DeepSeekDeployment object."""
        slot = self._slot(namespace, deployment)
        request = _Request(changes)
        with slot.queue_lock:
            slot.queue.append(request)
        with slot.write_lock:
            if not request.done.is_set():
                with slot.queue_lock:
                    batch, slot.queue = slot.queue, []
                try:
                    documents, refused = self._write(slot, namespace, deployment,
                                                     [r.changes for r in batch], owner)
                except BaseException as exc:
                    for item in batch:
                        item.error = exc
                        item.done.set()
                else:
                    for index, item in enumerate(batch):
                        item.result = documents
                        if index in refused:
                            item.error = AuthConfigFull(full_message(
                                f"{namespace}/{auth_configmap_name(deployment)}", slot.size or 0))
                        item.done.set()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _write(self, slot: _Slot, namespace: str, deployment: str, groups: list[Sequence[AuthChange]],
               owner: dict[str, Any]) -> tuple[AuthDocuments, tuple[int, ...]]:
        name = auth_configmap_name(deployment)
        if slot.resource_version is None or slot.owner_uid != owner["metadata"]["uid"]:
            self._load(slot, namespace, deployment)
        for _ in range(self._attempts):
            if slot.resource_version is not None and slot.owner_uid != owner["metadata"]["uid"]:
                # Someone else's ConfigMap of this name (or a leftover of a deleted deployment of the same name,
                # awaiting garbage collection) is never written over: NotOwned says so, with its controller.
                current = self._kube.get(CONFIGMAPS, namespace, name)
                if current is not None:
                    ensure_controlled(CONFIGMAPS, current, owner["metadata"]["uid"])
                self._load(slot, namespace, deployment)
                continue
            if slot.problem is not None and slot.resource_version is not None and slot.documents is None:
                # Unreadable and no earlier copy: writing would replace a revoked list nobody can read any more.
                raise KubeError(422, "Invalid", f"{slot.problem}; this operator holds no earlier copy of it: "
                                "restore it, or delete it to start an empty one", "PUT", name)
            base = slot.documents or AuthDocuments()
            fitted = fit_changes(base, groups, now=self._clock())
            updated = fitted.documents
            if fitted.size > CONFIGMAP_LIMIT:
                # Nothing left to leave out: fail the whole batch (nothing is stored, so no caller may go on as if
                # its revocations were) with what to do, instead of sending a write the API server refuses.
                raise KubeError(422, "Invalid", full_message(f"{namespace}/{name}", fitted.size)
                                + "; not even revocations fit now, so nothing is written until room is made",
                                "PUT", name)
            body = build_auth_configmap(
                name=name, namespace=namespace, labels=deployment_labels(deployment),
                owner_references=[owner_reference(owner)], documents=updated,
            )
            try:
                if slot.resource_version is None:
                    stored = self._kube.create(CONFIGMAPS, namespace, body)
                elif (encode_documents(updated) == encode_documents(base) and slot.problem is None
                      and slot.owner_uid == owner["metadata"]["uid"]):
                    return updated, fitted.refused
                else:
                    body["metadata"]["resourceVersion"] = slot.resource_version
                    stored = self._kube.replace(CONFIGMAPS, namespace, body)
            except (Conflict, NotFound):
                self._load(slot, namespace, deployment)
                continue
            slot.documents = updated
            slot.problem = None
            slot.resource_version = stored["metadata"]["resourceVersion"]
            slot.owner_uid = owner["metadata"]["uid"]
            slot.size = fitted.size
            if fitted.refused:
                log.warning("%s", full_message(f"{namespace}/{name}", fitted.size))
            return updated, fitted.refused
        raise KubeError(409, "Conflict", f"ConfigMap {namespace}/{name} kept changing under us", "PUT", name)
