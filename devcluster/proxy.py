"""Forward a loopback port to the ready endpoints of a Service, following them live (there is no kube-proxy here).

``ServiceProxy(api_client, namespace, service, local_port)`` (a context manager; ``local_port=0`` picks a free one)
watches the Service (for its port → EndpointSlice port name) and its EndpointSlices (label
``kubernetes.io/service-name``), and keeps the set of *ready* endpoints; each new TCP connection goes to the next of
them (round robin). A change of selector or readiness therefore reaches new connections as soon as the
controller-manager updates the slices (well under a second), while connections already open stay on their backend
until they end, so nothing in flight is dropped. A connection that arrives while no endpoint is ready waits (up to
``wait_seconds``) for one instead of being refused, and a backend that refuses the connection is skipped.

CLI: ``python -m devcluster proxy svc/NAME LOCAL_PORT [-n NAMESPACE]``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch

log = logging.getLogger("devcluster.proxy")

Backend = tuple[str, int]


class ServiceProxy:
    """A TCP proxy from ``host:local_port`` to the ready endpoints of one Service."""

    def __init__(self, api: client.ApiClient, namespace: str, service: str, local_port: int = 0, *,
                 host: str = "127.0.0.1", service_port: int | str | None = None, wait_seconds: float = 10.0,
                 on_change: Callable[[list[Backend]], None] | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.service = service
        self.host = host
        self.requested_port = local_port
        self.service_port = service_port
        self.wait_seconds = wait_seconds
        self.on_change = on_change
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self._svc: dict[str, Any] | None = None
        self._slices: dict[str, dict[str, Any]] = {}
        self._backends: list[Backend] = []
        self._cond = threading.Condition()
        self._rr = itertools.count()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        assert self._listener is not None, "start() the proxy first"
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.requested_port))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        for target, name in ((self._watch_service, "svc"), (self._watch_slices, "slices"), (self._accept, "accept")):
            thread = threading.Thread(target=target, name=f"proxy-{self.service}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> ServiceProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backends(self) -> list[Backend]:
        with self._cond:
            return list(self._backends)

    def wait_for_backends(self, timeout: float) -> list[Backend]:
        """Block until at least one endpoint is ready (or `timeout`); returns the ready endpoints."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._backends and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._backends)

    # ------------------------------------------------------------------ watching
    def _port_name(self) -> str | None:
        """The EndpointSlice port name of the chosen Service port (the Service port's name)."""
        ports = ((self._svc or {}).get("spec") or {}).get("ports") or []
        if not ports:
            return None
        chosen = ports[0]
        if self.service_port is not None:
            for port in ports:
                if self.service_port in (port.get("name"), port.get("port"), str(port.get("port"))):
                    chosen = port
                    break
        return chosen.get("name") or ""

    def _recompute(self) -> None:
        name = self._port_name()
        backends: list[Backend] = []
        if name is not None:
            for eps in self._slices.values():
                if eps.get("addressType") != "IPv4":
                    continue
                port = next((p.get("port") for p in eps.get("ports") or [] if (p.get("name") or "") == name), None)
                if port is None:
                    continue
                for endpoint in eps.get("endpoints") or []:
                    cond = endpoint.get("conditions") or {}
                    if cond.get("ready") is False or cond.get("terminating"):
                        continue
                    backends.extend((addr, int(port)) for addr in endpoint.get("addresses") or [])
        backends.sort()
        with self._cond:
            changed = backends != self._backends
            self._backends = backends
            self._cond.notify_all()
        if changed:
            log.info("svc/%s endpoints: %s", self.service, backends)
            if self.on_change:
                self.on_change(backends)

    def _watch_service(self) -> None:
        selector = f"metadata.name={self.service}"
        self._watch(self.core.list_namespaced_service, {"field_selector": selector}, self._on_service)

    def _watch_slices(self) -> None:
        selector = f"kubernetes.io/service-name={self.service}"
        self._watch(self.discovery.list_namespaced_endpoint_slice, {"label_selector": selector}, self._on_slice)

    def _on_service(self, kind: str, obj: dict[str, Any] | None, listing: list[dict[str, Any]] | None) -> None:
        if listing is not None:
            self._svc = listing[0] if listing else None
        elif kind == "DELETED":
            self._svc = None
        else:
            self._svc = obj
        self._recompute()

    def _on_slice(self, kind: str, obj: dict[str, Any] | None, listing: list[dict[str, Any]] | None) -> None:
        if listing is not None:
            self._slices = {s["metadata"]["name"]: s for s in listing}
        elif obj is not None:
            if kind == "DELETED":
                self._slices.pop(obj["metadata"]["name"], None)
            else:
                self._slices[obj["metadata"]["name"]] = obj
        self._recompute()

    def _watch(self, lister: Callable[..., Any], kwargs: dict[str, Any],
               handle: Callable[[str, dict[str, Any] | None, list[dict[str, Any]] | None], None]) -> None:
        while not self._stop.is_set():
            try:
                listing = lister(self.namespace, **kwargs)
                items = [self.api.sanitize_for_serialization(i) for i in listing.items]
                handle("LIST", None, items)
                version = listing.metadata.resource_version
                stream = watch.Watch().stream(lister, self.namespace, resource_version=version, timeout_seconds=20,
                                              _request_timeout=30, **kwargs)
                for event in stream:
                    if self._stop.is_set():
                        return
                    if event["type"] == "ERROR":
                        break
                    handle(event["type"], self.api.sanitize_for_serialization(event["object"]), None)
            except Exception as exc:  # relist after any watch failure (expired resourceVersion, API restart)
                if self._stop.is_set():
                    return
                log.debug("watch of svc/%s failed (%s); listing again", self.service, exc)
                self._stop.wait(0.5)

    # ------------------------------------------------------------------ forwarding
    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        """A connection to a ready endpoint, waiting for one up to `wait_seconds`."""
        deadline = time.monotonic() + self.wait_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            backends = self.wait_for_backends(max(0.0, deadline - time.monotonic()))
            if not backends:
                return None
            start = next(self._rr)
            for i in range(len(backends)):
                addr = backends[(start + i) % len(backends)]
                try:
                    upstream = socket.create_connection(addr, timeout=2)
                    upstream.settimeout(None)
                    return upstream
                except OSError as exc:
                    log.debug("backend %s:%s refused: %s", *addr, exc)
            self._stop.wait(0.1)
        return None

    def _serve(self, conn: socket.socket) -> None:
        upstream = self._connect()
        if upstream is None:
            log.warning("svc/%s has no ready endpoint; closing a connection", self.service)
            conn.close()
            return
        pump = threading.Thread(target=_pipe, args=(conn, upstream), daemon=True)
        pump.start()
        _pipe(upstream, conn)
        pump.join()
        for sock in (conn, upstream):
            sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then half-close the other side so both directions end cleanly."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
