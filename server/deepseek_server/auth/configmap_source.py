"""Auth state from the operator's auth ConfigMaps, watched through the Kubernetes API.

`--auth-configmap NS/X-auth` names the index ConfigMap. While its entries are inline it is the only object read;
once its `shards.json` lists N shards, the source also watches `X-auth-0` … `X-auth-<N-1>` (shard `i` holds
`revoked.<i>.json` and `limits.<i>.json`). The server's Role grants get and watch on exactly those names, so each
object is read with GET and then watched with a `metadata.name` field selector from that resourceVersion, one
thread per object. A 410 Gone (history compacted) or a dropped connection starts that object over with a fresh GET.
A change therefore applies as soon as the API server sends its event, and only the changed object is parsed
again. No state is applied until every listed shard is loaded (the previous state stays meanwhile); a document
that does not parse keeps the last good state and is logged; a deleted ConfigMap keeps it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from deepseek_server.auth.documents import (
    AuthEntries,
    AuthState,
    assemble_auth_state,
    documents_from_configmap,
    parse_auth_state,
    parse_entries,
    shard_count,
    shard_documents_from_configmap,
)

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 30.0


def parse_configmap_ref(ref: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` -> (namespace, name)."""
    namespace, sep, name = ref.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"--auth-configmap must be NAMESPACE/NAME, got {ref!r}")
    return namespace, name


def shard_configmap_name(index_name: str, shard: int) -> str:
    """The ConfigMap that holds shard `shard` of the index ConfigMap `index_name`."""
    return f"{index_name}-{shard}"


def _fields(configmap: Any) -> tuple[str | None, Any, Any]:
    """(resourceVersion, data, binaryData) of a V1ConfigMap or its dict form."""
    if isinstance(configmap, dict):
        metadata = configmap.get("metadata") or {}
        return metadata.get("resourceVersion"), configmap.get("data"), configmap.get("binaryData")
    return configmap.metadata.resource_version, configmap.data, configmap.binary_data


def state_from_configmap(configmap: Any) -> AuthState:
    """Parse a V1ConfigMap (or its dict form) whose entries are inline into an AuthState."""
    _, data, binary = _fields(configmap)
    return parse_auth_state(documents_from_configmap(data, binary))


def kubernetes_core_api() -> Any:
    """A CoreV1Api from the in-cluster service account, else from KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


class _ConfigMapWatch:
    """GET one ConfigMap, then watch it from that resourceVersion; every object seen goes to `on_object`."""

    def __init__(self, namespace: str, name: str, on_object: Callable[[Any], object],
                 core_api_factory: Callable[[], Any], watch_timeout_s: int, retry_delay_s: float) -> None:
        self.namespace, self.name = namespace, name
        self.on_object = on_object
        self._core_api_factory = core_api_factory
        self.watch_timeout_s = watch_timeout_s
        self.retry_delay_s = retry_delay_s
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name=f"auth-configmap-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, join: bool = True) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if join and self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        core = None
        delay = self.retry_delay_s
        while not self._stop.is_set():
            try:
                core = core or self._core_api_factory()
                current = core.read_namespaced_config_map(self.name, self.namespace)
                self.on_object(current)
                delay = self.retry_delay_s  # reachable again: next failure retries quickly
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    core.list_namespaced_config_map,
                    self.namespace,
                    field_selector=f"metadata.name={self.name}",
                    resource_version=current.metadata.resource_version,
                    timeout_seconds=self.watch_timeout_s,
                ):
                    if self._stop.is_set():
                        return
                    kind = event.get("type")
                    if kind in ("ADDED", "MODIFIED"):
                        self.on_object(event["object"])
                    elif kind == "DELETED":
                        log.warning("ConfigMap %s/%s was deleted; keeping the last auth state", self.namespace,
                                    self.name)
                continue  # the watch timed out: GET again (cheap) and resume
            except ApiException as exc:
                # 410 Gone (history compacted) lands here too: start over from a fresh GET
                log.warning("ConfigMap %s/%s: API error %s %s; retrying in %.0f s", self.namespace, self.name,
                            exc.status, exc.reason, delay)
            except Exception as exc:  # connection drops, config errors: retry, never die
                log.warning("ConfigMap %s/%s watch failed: %s; retrying in %.0f s", self.namespace, self.name, exc,
                            delay)
                core = None
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)


class ConfigMapAuthSource:
    """Keeps the auth state in step with the index ConfigMap and its shards; each is watched in a daemon thread."""

    def __init__(
        self,
        ref: str,
        on_state: Callable[[AuthState], None],
        *,
        core_api_factory: Callable[[], Any] = kubernetes_core_api,
        watch_timeout_s: int = 300,
        retry_delay_s: float = 1.0,
    ) -> None:
        self.namespace, self.name = parse_configmap_ref(ref)
        self.on_state = on_state
        self._core_api_factory = core_api_factory
        self.watch_timeout_s = watch_timeout_s
        self.retry_delay_s = retry_delay_s
        self._lock = threading.Lock()
        self._stopped = False
        self._index_watch: _ConfigMapWatch | None = None
        self._shard_watches: dict[int, _ConfigMapWatch] = {}
        self._applied_version: str | None = None
        # The last good index: (documents, inline entries); shards by number: (resourceVersion, entries).
        self._index: tuple[dict[str, Any], AuthEntries] | None = None
        self._shards: dict[int, tuple[str | None, AuthEntries]] = {}

    @property
    def _stop(self) -> threading.Event:
        """Set once stopped (the index watch's stop flag)."""
        return self._index_watch._stop if self._index_watch is not None else threading.Event()

    def _watch(self, name: str, on_object: Callable[[Any], object]) -> _ConfigMapWatch:
        return _ConfigMapWatch(self.namespace, name, on_object, self._core_api_factory, self.watch_timeout_s,
                               self.retry_delay_s)

    def start(self) -> None:
        self._index_watch = self._watch(self.name, self.apply)
        self._index_watch.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            watches = [w for w in (self._index_watch, *self._shard_watches.values()) if w is not None]
            self._shard_watches = {}
        for watch in watches:
            watch.stop(join=False)
        for watch in watches:
            watch.stop()

    def apply(self, configmap: Any) -> bool:
        """Apply the index ConfigMap; returns False (keeping the old state) when it does not parse."""
        version, data, binary = _fields(configmap)
        if version is not None and version == self._applied_version:
            return True
        try:
            docs = documents_from_configmap(data, binary)
            count = shard_count(docs)
            inline = parse_entries(docs) if count == 0 else AuthEntries()
            if count == 0:
                assemble_auth_state(docs, inline, [])  # refuse a bad index now, not when the shards arrive
        except ValueError as exc:
            log.error("ConfigMap %s/%s: %s; keeping the previous auth state", self.namespace, self.name, exc)
            return False
        self._applied_version = version
        with self._lock:
            self._index = (docs, inline)
            self._follow_shards(count)
            self._publish(f"ConfigMap {self.namespace}/{self.name} resourceVersion {version}")
        return True

    def apply_shard(self, shard: int, configmap: Any) -> bool:
        """Apply shard `shard`'s ConfigMap; returns False (keeping the old state) when it does not parse."""
        version, data, binary = _fields(configmap)
        known = self._shards.get(shard)
        if known is not None and version is not None and known[0] == version:
            return True
        name = shard_configmap_name(self.name, shard)
        try:
            docs = shard_documents_from_configmap(shard, data, binary)
            missing = [n for n in ("revoked", "limits") if n not in docs]
            if missing:
                raise ValueError(f"lacks {', '.join(f'{n}.{shard}.json' for n in missing)}")
            entries = parse_entries(docs, shard)
        except ValueError as exc:
            log.error("ConfigMap %s/%s: %s; keeping the previous auth state", self.namespace, name, exc)
            return False
        with self._lock:
            self._shards[shard] = (version, entries)
            self._publish(f"ConfigMap {self.namespace}/{name} resourceVersion {version}")
        return True

    def _follow_shards(self, count: int) -> None:
        """Watch shards 0..count-1 and no others (called under the lock)."""
        if self._stopped:
            return
        for shard in [s for s in self._shard_watches if s >= count]:
            self._shard_watches.pop(shard).stop(join=False)
            self._shards.pop(shard, None)
        for shard in range(count):
            if shard not in self._shard_watches:
                watch = self._watch(shard_configmap_name(self.name, shard),
                                    lambda obj, shard=shard: self.apply_shard(shard, obj))
                self._shard_watches[shard] = watch
                watch.start()

    def _publish(self, cause: str) -> None:
        """Hand a new state over once the index and every shard it lists are loaded (called under the lock)."""
        if self._index is None:
            return
        docs, inline = self._index
        count = shard_count(docs)
        loaded = [self._shards[s] for s in range(count) if s in self._shards]
        if len(loaded) < count:
            log.debug("auth state waits for %d of %d shards of %s", count - len(loaded), count, self.name)
            return
        try:
            state = assemble_auth_state(docs, inline, [entries for _, entries in loaded])
        except ValueError as exc:
            log.error("ConfigMap %s/%s: %s; keeping the previous auth state", self.namespace, self.name, exc)
            return
        self.on_state(state)
        log.info("auth state loaded (%s; generation %d, %d shards)", cause, state.generation, count)
