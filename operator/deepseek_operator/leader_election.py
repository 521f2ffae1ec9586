"""Leader election on a coordination.k8s.io Lease, with client-go's semantics (as cert-manager and Argo Rollouts use).

Two or more operator processes run; one holds the Lease and reconciles, the others wait and reconcile nothing.
- A candidate reads the Lease every `retry_period`. It takes the Lease when it is free, released, or when the
  record it last saw has not changed for the Lease's `leaseDurationSeconds` *by its own clock* (as client-go, it
  never compares the holder's `renewTime` with its own wall clock, so clock skew between nodes does not matter).
  Writes carry the read `resourceVersion`, so of two candidates at most one succeeds.
- The leader renews every `retry_period`. When no renewal has succeeded for `renew_deadline`, or a renewal finds
  another holder, it has lost the Lease and the process exits at once (client-go's OnStoppedLeading): nothing it
  started may run on. `renew_deadline < lease_duration`, so the old leader is gone before a candidate may take over.
- On a graceful stop the leader releases the Lease (holder emptied), so the next candidate takes it within one
  `retry_period` instead of waiting out the lease duration.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .kube import Conflict, KubeApi, KubeError, Resource, load_connection

log = logging.getLogger(__name__)

LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
# Candidates wait retry_period times a random factor in [1, 1 + JITTER) between attempts, as client-go does.
JITTER = 0.2
LOST_LEADERSHIP_EXIT_CODE = 1
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class LeaderElectionConfig:
    """Where the Lease lives, who we are, and client-go's three timings (seconds)."""

    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def validate(self) -> None:
        """Raise ValueError unless lease_duration > renew_deadline > retry_period * (1 + JITTER) > 0."""
        if self.retry_period <= 0:
            raise ValueError(f"leader election retry period must be positive, not {self.retry_period}s")
        if self.renew_deadline <= self.retry_period * (1 + JITTER):
            raise ValueError(f"leader election renew deadline ({self.renew_deadline}s) must be longer than "
                             f"{1 + JITTER} x the retry period ({self.retry_period}s)")
        if self.lease_duration <= self.renew_deadline:
            raise ValueError(f"leader election lease duration ({self.lease_duration}s) must be longer than the "
                             f"renew deadline ({self.renew_deadline}s), or a lost leader could still act while "
                             "another takes over")


def default_identity(environ: Mapping[str, str] | None = None) -> str:
    """`<pod name or host name>_<random>`: unique per process, readable in `kubectl get lease`."""
    environ = os.environ if environ is None else environ
    return f"{environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:12]}"


def in_cluster_namespace(path: str | None = None) -> str | None:
    """The pod's namespace from its service account mount, or None outside a cluster."""
    try:
        with open(path or SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def micro_time(now: datetime) -> str:
    """A Kubernetes MicroTime (`2026-01-02T03:04:05.123456Z`)."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_holder(lease: Mapping[str, Any] | None) -> str:
    """Who holds a Lease ('' when free, released, or absent)."""
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def lease_duration_of(lease: Mapping[str, Any], default: float) -> float:
    return float((lease.get("spec") or {}).get("leaseDurationSeconds") or default)


def claimed_lease(existing: Mapping[str, Any] | None, config: LeaderElectionConfig, now: datetime, *,
                  namespace: str) -> dict[str, Any]:
    """The Lease body that makes `config.identity` its holder, renewed at `now` (pure).

    Renewing keeps acquireTime and leaseTransitions; taking it from another holder (or a released Lease) sets a new
    acquireTime and counts one more transition. `existing`'s resourceVersion is kept, so a concurrent writer makes
    the write fail with 409 instead of both believing they lead.
    """
    stamp = micro_time(now)
    spec: dict[str, Any] = {"holderIdentity": config.identity,
                            "leaseDurationSeconds": max(1, round(config.lease_duration)),
                            "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}
    if existing is None:
        return {"apiVersion": LEASES.api_version, "kind": LEASES.kind,
                "metadata": {"name": config.name, "namespace": namespace}, "spec": spec}
    old = existing.get("spec") or {}
    transitions = int(old.get("leaseTransitions") or 0)
    if lease_holder(existing) == config.identity:
        spec["acquireTime"] = old.get("acquireTime") or stamp
        spec["leaseTransitions"] = transitions
    else:
        spec["leaseTransitions"] = transitions + 1
    meta = existing.get("metadata") or {}
    body = {key: value for key, value in existing.items() if key not in ("spec", "status")}
    body["metadata"] = dict(meta)
    body["spec"] = {**old, **spec}
    return body


def released_lease(existing: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The Lease body that gives it up at once: no holder, a one-second duration (client-go's ReleaseOnCancel)."""
    body = {key: value for key, value in existing.items() if key != "status"}
    body["spec"] = {**(existing.get("spec") or {}), "holderIdentity": "", "leaseDurationSeconds": 1,
                    "renewTime": micro_time(now)}
    return body


def record_of(lease: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    """What a candidate compares between reads to tell whether the holder is still renewing."""
    if lease is None:
        return None
    spec = lease.get("spec") or {}
    return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("acquireTime"),
            spec.get("leaseTransitions"), spec.get("leaseDurationSeconds"))


def may_take(lease: Mapping[str, Any] | None, identity: str, *, observed_at: float, now: float,
             default_duration: float) -> bool:
    """Whether a candidate may write itself into the Lease now (pure).

    Free, released, or already ours: yes. Held by another: only once the record has stayed unchanged (as this
    candidate saw it, by its own monotonic clock since `observed_at`) for the Lease's duration.
    """
    holder = lease_holder(lease)
    if lease is None or holder in ("", identity):
        return True
    return now - observed_at >= lease_duration_of(lease, default_duration)


class LeaderElector:
    """Takes, keeps and gives up one Lease; see the module docstring for the rules."""

    def __init__(self, kube: KubeApi, config: LeaderElectionConfig, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_lost: Callable[[str], None] | None = None) -> None:
        config.validate()
        self.kube = kube
        self.config = config
        self._monotonic = monotonic
        self._wall = wall
        self._on_lost = on_lost or exit_process
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = monotonic()
        self._last_renewal = 0.0
        self.last_attempt = monotonic()
        self.leading = False
        self._stop = threading.Event()
        self._lost_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @classmethod
    def connect(cls, config: LeaderElectionConfig, kubeconfig: str | None) -> LeaderElector:
        # Its own small pool and short timeout: a renewal must not queue behind reconciles, nor hang past the
        # renew deadline (the watchdog ends the process then anyway).
        kube = KubeApi(load_connection(kubeconfig), max_connections=2,
                       timeout=max(1.0, config.renew_deadline / 3))
        return cls(kube, config)

    def _observe(self, lease: Mapping[str, Any] | None) -> None:
        record = record_of(lease)
        if record != self._observed:
            self._observed = record
            self._observed_at = self._monotonic()

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when we hold the Lease afterwards. Raises nothing for API trouble (returns False)."""
        namespace, name = self.config.namespace, self.config.name
        self.last_attempt = self._monotonic()
        try:
            lease = self.kube.get(LEASES, namespace, name)
            self._observe(lease)
            if not may_take(lease, self.config.identity, observed_at=self._observed_at, now=self._monotonic(),
                            default_duration=self.config.lease_duration):
                return False
            body = claimed_lease(lease, self.config, self._wall(), namespace=namespace)
            if lease is None:
                written = self.kube.create(LEASES, namespace, body)
            else:
                written = self.kube.replace(LEASES, namespace, body)
        except Conflict:
            return False  # another candidate wrote first; read again next time
        except KubeError as exc:
            log.warning("leader election: lease %s/%s: %s", namespace, name, exc)
            return False
        except Exception as exc:  # a timeout or a dropped connection: not ours this round
            log.warning("leader election: lease %s/%s: %s: %s", namespace, name, type(exc).__name__, exc)
            return False
        self._observe(written)
        return True

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this process holds the Lease (True), or `stop` is set first (False)."""
        stop = stop or threading.Event()
        holder_logged = None
        while not stop.is_set():
            if self.try_acquire_or_renew():
                self.leading = True
                self._last_renewal = self.last_attempt
                log.info("leader election: %s now holds lease %s/%s", self.config.identity, self.config.namespace,
                         self.config.name)
                return True
            holder = self._observed[0] if self._observed else None
            if holder and holder != holder_logged:
                log.info("leader election: lease %s/%s is held by %s; standing by", self.config.namespace,
                         self.config.name, holder)
                holder_logged = holder
            stop.wait(self.config.retry_period * (1 + random.random() * JITTER))
        return False

    def keep_leading(self) -> None:
        """Renew in the background; the process exits as soon as the Lease is lost."""
        assert self.leading, "keep_leading() before acquire()"
        self._stop.clear()
        self._threads = [threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True),
                         threading.Thread(target=self._watchdog, name="lease-watchdog", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _lost(self, why: str) -> None:
        with self._lost_lock:  # the renew loop and the watchdog may both find out
            if self._stop.is_set():
                return
            self._stop.set()
            self.leading = False
        self._on_lost(why)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.config.retry_period):
            if self.try_acquire_or_renew():
                # Counted from the attempt's start, before renewTime was written: never later than others see it.
                self._last_renewal = self.last_attempt
            elif self._observed is not None and self._observed[0] not in ("", self.config.identity):
                self._lost(f"lease {self.config.namespace}/{self.config.name} is now held by {self._observed[0]}")
                return

    def _watchdog(self) -> None:
        # Separate from the renew loop so that a renewal stuck in a request cannot keep a lost leader acting.
        tick = min(0.5, self.config.retry_period / 4)
        while not self._stop.wait(tick):
            silent = self._monotonic() - self._last_renewal
            if silent > self.config.renew_deadline:
                self._lost(f"lease {self.config.namespace}/{self.config.name} not renewed for {silent:.1f}s "
                           f"(renew deadline {self.config.renew_deadline:g}s)")
                return

    def step_down(self) -> None:
        """Stop renewing and release the Lease if it is still ours (after a graceful stop)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.config.renew_deadline)
        if not self.leading:
            return
        self.leading = False
        namespace, name = self.config.namespace, self.config.name
        try:
            lease = self.kube.get(LEASES, namespace, name)
            if lease is not None and lease_holder(lease) == self.config.identity:
                self.kube.replace(LEASES, namespace, released_lease(lease, self._wall()))
                log.info("leader election: released lease %s/%s", namespace, name)
        except Exception as exc:  # the Lease then expires on its own after its duration
            log.warning("leader election: could not release lease %s/%s (%s: %s); it expires on its own",
                        namespace, name, type(exc).__name__, exc)

    def standby_healthy(self) -> bool:
        """The candidate loop is alive: it tried within the last few retry periods (or a minute)."""
        return self._monotonic() - self.last_attempt <= max(60.0, 5 * self.config.retry_period)

    def close(self) -> None:
        self.kube.close()


def exit_process(why: str) -> None:
    """client-go's OnStoppedLeading: say why and end the process now, without running any more of its work."""
    log.critical("leader election lost: %s; exiting so that nothing more is reconciled by this process", why)
    exit_now(LOST_LEADERSHIP_EXIT_CODE)


def exit_now(code: int) -> None:
    """End the process at once, without waiting for any thread: the exit handlers run (the log is written out, and
    the Kubernetes client deletes the temporary files it decoded a kubeconfig's certificate and key into), the
    interpreter's join of every worker thread does not."""
    try:
        atexit._run_exitfuncs()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def liveness_address(endpoint: str) -> tuple[str, int, str]:
    """(host, port, path) of a liveness URL `http://HOST:PORT/PATH`; ValueError for anything else (pure)."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # not a number
        port = None
    if parts.scheme != "http" or not port or not parts.hostname:
        raise ValueError(f"liveness endpoint {endpoint!r}: expected http://HOST:PORT/PATH (or 'none')")
    return parts.hostname, port, parts.path or "/"


class _ThreadingHTTPServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class StandbyLiveness:
    """The liveness endpoint while this process waits for the Lease (kopf serves it once it leads)."""

    def __init__(self, endpoint: str, healthy: Callable[[], bool],
                 bodies: tuple[bytes, bytes] = (b'{"leaderElection": "standby"}', b'{"leaderElection": "stuck"}')
                 ) -> None:
        """`bodies`: what a probe is answered when healthy, and when not."""
        host, port, path = liveness_address(endpoint)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != path:
                    self.send_error(404)
                    return
                ok = healthy()
                body = bodies[0] if ok else bodies[1]
                self.send_response(200 if ok else 500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes come every few seconds: no log
                return

        server_class = _ThreadingHTTPServerV6 if ":" in host else ThreadingHTTPServer  # `http://[::]:8080/healthz`
        self._server = server_class((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="standby-liveness", daemon=True)

    def __enter__(self) -> StandbyLiveness:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
