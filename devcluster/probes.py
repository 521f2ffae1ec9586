"""Container probes run the kubelet's way: httpGet, tcpSocket and exec, with the pod's own timing and thresholds.

A ``Prober`` is one thread per probe of one running container (as in the kubelet's prober workers). It waits
``initialDelaySeconds``, then probes every ``periodSeconds`` with ``timeoutSeconds``, and flips its result after
``successThreshold`` consecutive successes or ``failureThreshold`` consecutive failures. httpGet and tcpSocket go
from the host to the pod IP through the cluster bridge, as the kubelet's do; exec runs inside the container's
network and mount namespaces (``nsenter``) with the container's environment.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("devcluster.probes")


@dataclass
class ProbeTarget:
    """What a probe needs to know about the container it checks."""

    pod_ip: str
    ports: dict[str, int]  # named container ports
    pid: int
    env: dict[str, str] = field(default_factory=dict)


def _port(value: Any, target: ProbeTarget) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    if value in target.ports:
        return target.ports[value]
    raise ValueError(f"port {value!r} is not a named container port")


def probe_once(probe: dict[str, Any], target: ProbeTarget) -> tuple[bool, str]:
    """Run one probe; (success, message)."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            return _http(probe["httpGet"], target, timeout)
        if "tcpSocket" in probe:
            spec = probe["tcpSocket"]
            with socket.create_connection((spec.get("host") or target.pod_ip, _port(spec["port"], target)),
                                          timeout=timeout):
                return True, ""
        if "exec" in probe:
            return _exec(probe["exec"]["command"], target, timeout)
        if "grpc" in probe:
            return False, "grpc probes are not supported by devcluster"
        return False, "probe has no handler"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _http(spec: dict[str, Any], target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    host = spec.get("host") or target.pod_ip
    port = _port(spec["port"], target)
    path = spec.get("path") or "/"
    headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
    headers.setdefault("User-Agent", "kube-probe/1.37")
    if (spec.get("scheme") or "HTTP").upper() == "HTTPS":
        # The kubelet does not verify probe certificates either.
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read(1024).decode(errors="replace")
    finally:
        conn.close()
    if 200 <= resp.status < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {resp.status} {body[:200]}".strip()


def _exec(command: list[str], target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    argv = ["nsenter", "-t", str(target.pid), "-n", "-m", "-u", "--", *command]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=target.env, check=False)
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {timeout:g}s"
    if proc.returncode == 0:
        return True, ""
    out = (proc.stdout + proc.stderr).decode(errors="replace").strip()[:200]
    return False, f"command exited with {proc.returncode}: {out}"


class Prober(threading.Thread):
    """Probes one container until stopped; reports each result flip through `on_change(success, message)`."""

    def __init__(self, kind: str, probe: dict[str, Any], target: ProbeTarget,
                 on_change: Callable[[bool, str], None], name: str) -> None:
        super().__init__(name=f"{kind}-probe-{name}", daemon=True)
        self.kind = kind
        self.probe = probe
        self.target = target
        self.on_change = on_change
        self.stopped = threading.Event()
        self.result: bool | None = None

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        period = float(self.probe.get("periodSeconds") or 10)
        success_needed = int(self.probe.get("successThreshold") or 1)
        failure_needed = int(self.probe.get("failureThreshold") or 3)
        if self.stopped.wait(float(self.probe.get("initialDelaySeconds") or 0)):
            return
        successes = failures = 0
        while not self.stopped.is_set():
            ok, message = probe_once(self.probe, self.target)
            if self.stopped.is_set():
                return
            if ok:
                successes, failures = successes + 1, 0
                if self.result is not True and successes >= success_needed:
                    self.result = True
                    self.on_change(True, "")
            else:
                successes, failures = 0, failures + 1
                log.debug("%s probe of %s failed: %s", self.kind, self.name, message)
                if self.result is not False and failures >= failure_needed:
                    self.result = False
                    self.on_change(False, message)
                    if self.kind in ("liveness", "startup"):
                        return  # the container is killed; a new run gets new probers
            if self.stopped.wait(period):
                return
