"""Writes a deployment's auth ConfigMaps for many concurrent reconciles without losing any change.

Every change (a revocation, a key's limits, the issuer's JWKS) goes through `commit`, which queues it and lets one
thread per deployment write all queued changes together (group commit): each ConfigMap of the layout
(`auth_config.Layout`: the `<deployment>-auth` index, and once the entries outgrow it, its shards
`<deployment>-auth-<i>`) that the changes touch is written with a resourceVersion-guarded update, shards before the
index; on 409 everything is re-read and the changes re-applied. `commit` returns only once every change is stored,
so a caller may then forget it.

Upgrade: a deployment written by an earlier version has the inline layout; it is read as it is and stays inline
until it would pass `INLINE_BUDGET`, when one commit writes the shards (with every entry, revocations included)
and then the index that lists them. Until the index is replaced, readers keep reading the inline entries, so no
revocation is ever out of view.

No ConfigMap grows past the API server's 1 MiB cap (`auth_config.fit_changes`): once the fullest one is over the
new-entry budget, a commit that adds a new key's limits raises `AuthConfigFull` after storing the rest of its
changes (revocations always land), and the caller keeps that key waiting.
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
    INLINE_BUDGET,
    NEW_ENTRY_BUDGET,
    SHARD_COUNT,
    AuthChange,
    AuthDocuments,
    Encoded,
    Layout,
    build_auth_object,
    build_layout,
    configmap_size,
    decode_layout,
    fit_changes,
    index_shard_count,
    outgrows_inline,
    shard_configmap_name,
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
    """What a person reads when the (fullest) auth ConfigMap has no room for new keys: how full, and what to do."""
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
    # Bytes of data and binaryData of the fullest ConfigMap as last read or written (what the API server counts
    # against its cap).
    size: int | None = None
    # The layout as last read or written, each object's resourceVersion and content as stored, by name.
    layout: Layout | None = None
    versions: dict[str, str] = field(default_factory=dict)
    contents: dict[str, Encoded] = field(default_factory=dict)
    # The documents as last read or written while the ConfigMap was known (read as this operator writes it), else
    # None: set at the end of every locked section, so that readers take them without waiting for a write.
    known: AuthDocuments | None = None

    def settle(self) -> None:
        """Publish the state for lock-free readers (call holding `write_lock`)."""
        self.known = self.documents if self.resource_version is not None and self.problem is None else None


class AuthConfigStore:
    """Cached documents and serialized writes of every deployment's auth ConfigMap."""

    def __init__(self, kube: KubeApi, *, clock: Callable[[], float] = time.time, attempts: int = 20,
                 shard_count: int = SHARD_COUNT) -> None:
        self._kube = kube
        self._clock = clock
        self._attempts = attempts
        self._shard_count = shard_count
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._slots_lock = threading.Lock()

    def _slot(self, namespace: str, deployment: str) -> _Slot:
        with self._slots_lock:
            return self._slots.setdefault((namespace, deployment), _Slot())

    def documents(self, namespace: str, deployment: str, *, refresh: bool = False) -> AuthDocuments | None:
        """The documents as last read or written (read from the API on first use); None while no ConfigMap."""
        slot = self._slot(namespace, deployment)
        known = slot.known
        if known is not None and not refresh:
            return known
        with slot.write_lock:
            try:
                if refresh or slot.resource_version is None:
                    self._load(slot, namespace, deployment)
                return slot.documents if slot.resource_version is not None else None
            finally:
                slot.settle()

    def read(self, namespace: str, deployment: str, *, refresh: bool = False) -> tuple[AuthDocuments | None, str]:
        """(documents, "") when the ConfigMap was read as this operator writes it, else (None, why it is unknown).

        Decisions that act on what is published or revoked must not read a missing or unreadable ConfigMap as
        "nothing published".
        """
        slot = self._slot(namespace, deployment)
        # Without waiting for a write in progress: what it stores was not stored yet when this was called.
        known = slot.known
        if known is not None and not refresh:
            return known, ""
        with slot.write_lock:
            try:
                if refresh or slot.resource_version is None or slot.problem is not None:
                    self._load(slot, namespace, deployment)
            except KubeError as exc:
                return None, (f"ConfigMap {namespace}/{auth_configmap_name(deployment)} cannot be read "
                              f"({exc.status} {exc.reason})")
            finally:
                slot.settle()
            if slot.problem is not None:
                return None, slot.problem
            return slot.documents, ""

    def problem(self, namespace: str, deployment: str) -> str | None:
        """Why the ConfigMap's content was unknown when last read or written (None: it was known); no API call."""
        return self._slot(namespace, deployment).problem

    def usage(self, namespace: str, deployment: str) -> int | None:
        """The ConfigMap's size as last read or written (None before either); no API call."""
        return self._slot(namespace, deployment).size

    def new_keys_wait_reason(self, namespace: str, deployment: str) -> str:
        """"" while new keys fit, else why they wait (from the size last read or written)."""
        slot = self._slot(namespace, deployment)
        size, layout = slot.size, slot.layout
        if size is None or size <= NEW_ENTRY_BUDGET or layout is None or layout.shards == 0:
            return ""  # an inline layout past the budget moves to shards on its next write instead
        return full_message(f"{namespace}/{layout.fullest(auth_configmap_name(deployment))}", size)

    def _load(self, slot: _Slot, namespace: str, deployment: str) -> None:
        name = auth_configmap_name(deployment)
        current = self._kube.get(CONFIGMAPS, namespace, name)
        if current is None:
            # Keep the documents last known: if someone deleted the ConfigMap, the next write recreates it with
            # every revocation this process knew of instead of an empty list.
            slot.resource_version, slot.owner_uid = None, None
            slot.versions, slot.contents = {}, {}
            slot.problem = f"ConfigMap {namespace}/{name} does not exist"
            return
        try:
            if _controller(current) != ("DeepSeekDeployment", deployment):
                # Someone else's ConfigMap of this name: its content is never read as (or carried into) ours.
                slot.problem = (f"ConfigMap {namespace}/{name} is not controlled by DeepSeekDeployment "
                                f"{namespace}/{deployment}")
                slot.size = configmap_size(current.get("data") or {}, current.get("binaryData") or {})
            else:
                objects = [current, *self._read_shards(namespace, deployment, current)]
                versions = {n: o["metadata"]["resourceVersion"] for n, o in zip(
                    (name, *(shard_configmap_name(name, i) for i in range(len(objects) - 1))), objects, strict=True)}
                if slot.problem is None and slot.documents is not None and versions == slot.versions:
                    return  # nothing changed since it was last read or written: no need to decode it again
                contents = [(o.get("data") or {}, o.get("binaryData") or {}) for o in objects]
                slot.documents = decode_layout(contents[0], contents[1:])
                # As this operator would write them now: a shard stored differently (an entry in the wrong shard,
                # another encoding) differs from `contents` and is rewritten by the next write.
                slot.layout = build_layout(slot.documents, len(objects) - 1)
                slot.versions = versions
                slot.contents = dict(zip(slot.layout.names(name), contents, strict=True))
                slot.size = slot.layout.size
                slot.problem = None
        except (ValueError, TypeError, AttributeError, OSError) as exc:
            # Keep the documents last known (a write repairs the ConfigMaps from them) and say what is wrong.
            slot.problem = f"ConfigMap {namespace}/{name} cannot be read: {str(exc)[:200]}"
            slot.size = configmap_size(current.get("data") or {}, current.get("binaryData") or {})
            log.warning("%s", slot.problem)
        slot.resource_version = current["metadata"]["resourceVersion"]
        slot.owner_uid = controller_uid(current)

    def _read_shards(self, namespace: str, deployment: str, index: dict[str, Any]) -> list[dict[str, Any]]:
        """The shard ConfigMaps the index lists; ValueError when one is missing or not this deployment's."""
        name = auth_configmap_name(deployment)
        count = index_shard_count(index.get("data"), index.get("binaryData"))
        shards = []
        for number in range(count):
            shard_name = shard_configmap_name(name, number)
            shard = self._kube.get(CONFIGMAPS, namespace, shard_name)
            if shard is None:
                raise ValueError(f"its shard {namespace}/{shard_name} ({number + 1} of {count}) does not exist")
            if _controller(shard) != ("DeepSeekDeployment", deployment):
                raise ValueError(f"its shard {namespace}/{shard_name} is not controlled by DeepSeekDeployment "
                                 f"{namespace}/{deployment}")
            shards.append(shard)
        return shards

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
                    slot.settle()
                    for item in batch:
                        item.error = exc
                        item.done.set()
                else:
                    slot.settle()
                    for index, item in enumerate(batch):
                        item.result = documents
                        if index in refused:
                            fullest = (slot.layout.fullest(auth_configmap_name(deployment)) if slot.layout
                                       else auth_configmap_name(deployment))
                            item.error = AuthConfigFull(full_message(f"{namespace}/{fullest}", slot.size or 0))
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
            shards = slot.layout.shards if slot.layout is not None else 0
            now = self._clock()
            fitted = fit_changes(base, groups, now=now, shards=shards, previous=slot.layout)
            if outgrows_inline(fitted, shards):
                fitted = fit_changes(base, groups, now=now, shards=self._shard_count)
                log.info("auth entries of %s/%s move to %d shard ConfigMaps (one would pass %s)", namespace,
                         deployment, self._shard_count, _kib(INLINE_BUDGET))
            layout = fitted.layout
            assert layout is not None
            if fitted.size > CONFIGMAP_LIMIT:
                # Nothing left to leave out: fail the whole batch (nothing is stored, so no caller may go on as if
                # its revocations were) with what to do, instead of sending a write the API server refuses.
                raise KubeError(422, "Invalid", full_message(f"{namespace}/{layout.fullest(name)}", fitted.size)
                                + "; not even revocations fit now, so nothing is written until room is made",
                                "PUT", name)
            names = layout.names(name)
            # Shards first, the index last: an index never lists a shard that does not hold its entries yet.
            pending = [(n, c) for n, c in zip(names, layout.contents, strict=True)
                       if n != name and slot.contents.get(n) != c]
            if (slot.resource_version is None or slot.problem is not None
                    or slot.contents.get(name) != layout.contents[0]):
                pending.append((name, layout.contents[0]))
            try:
                if any(n != name and n not in slot.versions for n, _ in pending):
                    # Shards this process has not read are about to be taken over (written by a move to shards that
                    # stopped half-way): only while the index is still as read, so that shards another writer has
                    # meanwhile filled and listed are never overwritten from a stale view.
                    current = self._kube.get(CONFIGMAPS, namespace, name)
                    if (current["metadata"]["resourceVersion"] if current else None) != slot.resource_version:
                        raise Conflict(409, "Conflict", "the index changed", "GET", name)
                for object_name, content in pending:
                    self._put(slot, namespace, object_name, content, owner, index=object_name == name)
            except (Conflict, NotFound):
                self._load(slot, namespace, deployment)
                continue
            slot.documents = updated = fitted.documents
            slot.problem = None
            slot.owner_uid = owner["metadata"]["uid"]
            slot.layout = layout
            slot.size = fitted.size
            if fitted.refused:
                log.warning("%s", full_message(f"{namespace}/{layout.fullest(name)}", fitted.size))
            return updated, fitted.refused
        raise KubeError(409, "Conflict", f"ConfigMap {namespace}/{name} kept changing under us", "PUT", name)

    def _put(self, slot: _Slot, namespace: str, name: str, content: Encoded, owner: dict[str, Any], *,
             index: bool) -> None:
        """Create or replace one ConfigMap of the layout under its resourceVersion; Conflict/NotFound when it moved.

        A shard this process has not read (left by a write that stopped half-way) is read first and, once it is
        this deployment's, replaced; someone else's raises NotOwned.
        """
        body = build_auth_object(name=name, namespace=namespace, labels=deployment_labels(owner["metadata"]["name"]),
                                 owner_references=[owner_reference(owner)], content=content)
        version = slot.resource_version if index else slot.versions.get(name)
        if version is None and not index:
            existing = self._kube.get(CONFIGMAPS, namespace, name)
            if existing is not None:
                ensure_controlled(CONFIGMAPS, existing, owner["metadata"]["uid"])
                version = existing["metadata"]["resourceVersion"]
        if version is None:
            stored = self._kube.create(CONFIGMAPS, namespace, body)
        else:
            body["metadata"]["resourceVersion"] = version
            stored = self._kube.replace(CONFIGMAPS, namespace, body)
        slot.versions[name] = stored["metadata"]["resourceVersion"]
        slot.contents[name] = content
        if index:
            slot.resource_version = stored["metadata"]["resourceVersion"]


def _controller(configmap: dict[str, Any]) -> tuple[Any, Any]:
    """(kind, name) of the object's controller, (None, None) without one."""
    controller = next((ref for ref in configmap["metadata"].get("ownerReferences") or [] if ref.get("controller")),
                      {})
    return controller.get("kind"), controller.get("name")
