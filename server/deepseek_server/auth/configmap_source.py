"""Auth state from the operator's `<deployment>-auth` ConfigMap, watched through the Kubernetes API.

The server's Role grants only get and watch on that one ConfigMap, so the source reads it with GET and then
watches it with a `metadata.name` field selector from that resourceVersion. A 410 Gone (history compacted) or a
dropped connection starts over with a fresh GET. A change therefore applies as soon as the API server sends the
event. A document that does not parse keeps the last good state and is logged; a deleted ConfigMap keeps it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from deepseek_server.auth.documents import AuthState, documents_from_configmap, parse_auth_state

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 30.0


def parse_configmap_ref(ref: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` -> (namespace, name)."""
    namespace, sep, name = ref.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"--auth-configmap must be NAMESPACE/NAME, got {ref!r}")
    return namespace, name


def state_from_configmap(configmap: Any) -> AuthState:
    """Parse a V1ConfigMap (or its dict form) into an AuthState."""
    if isinstance(configmap, dict):
        return parse_auth_state(documents_from_configmap(configmap.get("data"), configmap.get("binaryData")))
    return parse_auth_state(documents_from_configmap(configmap.data, configmap.binary_data))


def kubernetes_core_api() -> Any:
    """A CoreV1Api from the in-cluster service account, else from KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


class ConfigMapAuthSource:
    """Keeps the auth state in step with one ConfigMap; runs its watch in a daemon thread."""

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self._applied_version: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="auth-configmap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def apply(self, configmap: Any) -> bool:
        """Apply one ConfigMap object; returns False (keeping the old state) when it does not parse."""
        metadata = configmap["metadata"] if isinstance(configmap, dict) else configmap.metadata
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else metadata.resource_version
        if version is not None and version == self._applied_version:
            return True
        try:
            state = state_from_configmap(configmap)
        except ValueError as exc:
            log.error("ConfigMap %s/%s: %s; keeping the previous auth state", self.namespace, self.name, exc)
            return False
        self._applied_version = version
        self.on_state(state)
        log.info("auth state loaded from ConfigMap %s/%s (resourceVersion %s, generation %d)", self.namespace,
                 self.name, version, state.generation)
        return True

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        core = None
        delay = self.retry_delay_s
        while not self._stop.is_set():
            try:
                core = core or self._core_api_factory()
                current = core.read_namespaced_config_map(self.name, self.namespace)
                self.apply(current)
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
                        self.apply(event["object"])
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
