"""A metadata-only watch of the ApiKey Secrets: which Secret is at which resourceVersion, owned by which key.

It replaces reading every key's Secret on a timer: a Secret that someone else edits or deletes produces an event
for exactly its key, and after a restart a key whose Secret is still at the version its status recorded needs no
read at all. The list and the watch ask for PartialObjectMetadata, so no token ever reaches the operator this way,
and only (resourceVersion, owner) of each Secret is kept: about a hundred bytes a key.

Needs `list` and `watch` on Secrets where the keys live. Without them (403) the watch reports itself unavailable
and the operator falls back to reading each Secret on a timer (see ApiKeyReconciler's drift interval).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .kube import SECRETS, Gone, KubeApi, KubeError
from .names import apikey_secret_labels

log = logging.getLogger(__name__)
_NAME_LABEL = "app.kubernetes.io/name"
_UID_LABEL = "deepseek.ai/apikey-uid"
# Every ApiKey Secret carries these (apikey_secret_labels); an edit that removes them reads as a deletion.
LABEL_SELECTOR = f"{_NAME_LABEL}={apikey_secret_labels('', '')[_NAME_LABEL]},{_UID_LABEL}"
WATCH_TIMEOUT_SECONDS = 300
MAX_RETRY_DELAY = 60.0


@dataclass(frozen=True, slots=True)
class SecretVersion:
    """What the watch knows of one ApiKey Secret: its resourceVersion and the ApiKey that owns it."""

    resource_version: str
    owner_uid: str | None
    owner_name: str | None


def secret_version(meta: Mapping[str, Any]) -> SecretVersion:
    """The SecretVersion of a Secret's metadata (pure): its owner is the ownerReference of kind ApiKey."""
    owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "ApiKey"), None)
    return SecretVersion(str(meta.get("resourceVersion", "")), owner.get("uid") if owner else None,
                         owner.get("name") if owner else None)


def changed_secrets(before: Mapping[str, SecretVersion], after: Mapping[str, SecretVersion]
                    ) -> list[tuple[str, SecretVersion, SecretVersion | None]]:
    """(name, what is known of it, its new version or None when gone) for every Secret that differs between two
    listings (pure): what a re-list after a broken watch reports as changed."""
    changes: list[tuple[str, SecretVersion, SecretVersion | None]] = []
    for name, old in before.items():
        new = after.get(name)
        if new is None or new.resource_version != old.resource_version:
            changes.append((name, old, new))
    changes.extend((name, new, new) for name, new in after.items() if name not in before)
    return changes


# (namespace, ApiKey name, Secret name, its resourceVersion or None when deleted)
ChangeHandler = Callable[[str, str, str, str | None], None]


class ApiKeySecretWatch:
    """Lists then watches the ApiKey Secrets of `namespaces` (None: every namespace) in background threads."""

    def __init__(self, kube: KubeApi, namespaces: Iterable[str] | None, on_change: ChangeHandler) -> None:
        self._kube = kube
        self._scopes: list[str | None] = list(namespaces) if namespaces is not None else [None]
        self._on_change = on_change
        self._versions: dict[tuple[str, str], SecretVersion] = {}
        self._lock = threading.Lock()
        self._synced: set[str | None] = set()
        # Scopes listed at least once: a scope's first listing is the baseline (every key is reconciled at start
        # anyway), later ones report what changed while the watch was broken.
        self._listed_once: set[str | None] = set()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        # Why the watch cannot run (no list/watch permission); empty while it can.
        self.unavailable = ""

    def start(self) -> None:
        for scope in self._scopes:
            thread = threading.Thread(target=self._run, args=(scope,), daemon=True,
                                      name=f"secret-watch-{scope or 'all'}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopped.set()

    @property
    def synced(self) -> bool:
        """Whether every watched namespace has been listed and its watch is running."""
        return not self.unavailable and len(self._synced) == len(self._scopes)

    @property
    def settled(self) -> bool:
        """Synced, or known not to be able to run: nothing to wait for either way."""
        return self.synced or bool(self.unavailable)

    def __len__(self) -> int:
        return len(self._versions)

    def lookup(self, namespace: str, name: str) -> SecretVersion | None:
        """The Secret's version as last seen; None when it is not known to exist or the watch is not in sync."""
        if not self.synced:
            return None
        return self._versions.get((namespace, name))

    def _run(self, scope: str | None) -> None:
        delay = 1.0
        while not self._stopped.is_set():
            try:
                resource_version = self._list(scope)
                delay = 1.0
                while not self._stopped.is_set():
                    for event_type, meta in self._kube.watch_metadata(
                            SECRETS, scope, label_selector=LABEL_SELECTOR, resource_version=resource_version,
                            timeout_seconds=WATCH_TIMEOUT_SECONDS):
                        resource_version = str(meta.get("resourceVersion") or resource_version)
                        if event_type in ("ADDED", "MODIFIED", "DELETED"):
                            self._apply(event_type, meta)
            except Gone:
                continue  # too old to resume: list again (the listing reports what changed meanwhile)
            except KubeError as exc:
                if exc.status in (401, 403):
                    self.unavailable = (f"cannot list/watch Secrets ({exc.status} {exc.reason}); each key's "
                                        "Secret is read on a timer instead")
                    log.warning("ApiKey Secret watch: %s", self.unavailable)
                    return
                log.warning("ApiKey Secret watch (%s) failed: %s; listing again in %.0f s", scope or "all namespaces",
                            exc, delay)
            except Exception as exc:  # connection reset, timeout: list again (metadata only: no token in `exc`)
                log.warning("ApiKey Secret watch (%s) broke: %s: %s; listing again in %.0f s",
                            scope or "all namespaces", type(exc).__name__, str(exc)[:300], delay)
            self._synced.discard(scope)
            self._stopped.wait(delay)
            delay = min(MAX_RETRY_DELAY, delay * 2)

    def _list(self, scope: str | None) -> str:
        items, resource_version = self._kube.list_metadata(SECRETS, scope, label_selector=LABEL_SELECTOR)
        listed = {(str(meta.get("namespace")), str(meta.get("name"))): secret_version(meta)
                  for meta in (item.get("metadata") or {} for item in items)}
        with self._lock:
            before = {key: value for key, value in self._versions.items() if scope is None or key[0] == scope}
            for key in before:
                del self._versions[key]
            self._versions.update(listed)
        first = scope not in self._listed_once
        self._listed_once.add(scope)
        self._synced.add(scope)
        if not first:
            by_name = {f"{ns}/{name}": value for (ns, name), value in before.items()}
            after = {f"{ns}/{name}": value for (ns, name), value in listed.items()}
            for qualified, old, new in changed_secrets(by_name, after):
                namespace, name = qualified.split("/", 1)
                self._notify(namespace, name, old, new)
        log.info("ApiKey Secret watch: %d Secret(s) listed in %s", len(listed), scope or "all namespaces")
        return resource_version

    def _apply(self, event_type: str, meta: Mapping[str, Any]) -> None:
        key = (str(meta.get("namespace")), str(meta.get("name")))
        new = secret_version(meta)
        with self._lock:
            old = self._versions.get(key)
            if event_type == "DELETED":
                self._versions.pop(key, None)
            else:
                self._versions[key] = new
        self._notify(key[0], key[1], old or new, None if event_type == "DELETED" else new)

    def _notify(self, namespace: str, name: str, known: SecretVersion, new: SecretVersion | None) -> None:
        # The key that owned it as well as the one that owns it now: a Secret whose owner reference was removed (or
        # pointed elsewhere) is no longer its key's, which that key must hear of.
        owners = dict.fromkeys(owner for owner in (new.owner_name if new else None, known.owner_name) if owner)
        for owner in owners:
            try:
                self._on_change(namespace, owner, name, new.resource_version if new else None)
            except Exception:
                log.exception("ApiKey Secret watch: handling a change of %s/%s failed", namespace, name)

