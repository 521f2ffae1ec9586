"""`python -m devcluster logs POD [-c C] [-f] [-p] [-n NS]` and `python -m devcluster proxy svc/NAME LOCAL_PORT`.

There is no kubelet API here, so ``kubectl logs`` and ``kubectl port-forward`` cannot work; these read the log
files of process pods from the cluster's state directory and proxy a Service's ready endpoints instead.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devcluster.cluster import DevCluster


def register(sub: Any, attach: Callable[[str], DevCluster]) -> None:
    """Add the `logs` and `proxy` subcommands to the devcluster CLI."""
    logs = sub.add_parser("logs", help="print the logs of a container of a process pod")
    logs.add_argument("pod")
    logs.add_argument("-c", "--container")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing (across restarts) until deleted")
    logs.add_argument("-p", "--previous", action="store_true", help="the previous run of the container")
    logs.set_defaults(func=lambda args: cmd_logs(args, attach(args.name)))
    proxy = sub.add_parser("proxy", help="forward a local port to the ready endpoints of a Service")
    proxy.add_argument("service", help="svc/NAME")
    proxy.add_argument("local_port", type=int)
    proxy.add_argument("-n", "--namespace", default="default")
    proxy.add_argument("--port", help="the Service port (name or number; default its first)")
    proxy.add_argument("--address", default="127.0.0.1")
    proxy.set_defaults(func=lambda args: cmd_proxy(args, attach(args.name)))


def pod_dir(cluster: DevCluster, namespace: str, pod: str) -> tuple[Path | None, list[str]]:
    """The state folder of a process pod and its container names (from the API when the pod still exists)."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    try:
        obj = core.read_namespaced_pod(pod, namespace)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        matches = sorted((cluster.state_dir / "pods").glob(f"{namespace}_{pod}_*"))
        if not matches:
            return None, []
        return matches[-1], sorted(p.name for p in (matches[-1] / "logs").iterdir())
    folder = cluster.state_dir / "pods" / f"{namespace}_{pod}_{obj.metadata.uid}"
    return folder, [c.name for c in obj.spec.containers]


def _runs(folder: Path, container: str) -> list[Path]:
    logs = folder / "logs" / container
    if not logs.is_dir():
        return []
    return sorted(logs.glob("*.log"), key=lambda p: int(p.stem))


def cmd_logs(args: argparse.Namespace, cluster: DevCluster) -> int:
    folder, containers = pod_dir(cluster, args.namespace, args.pod)
    if folder is None:
        print(f'error: pod "{args.pod}" not found in namespace "{args.namespace}"', file=sys.stderr)
        return 1
    container = args.container
    if container is None:
        if not containers:
            print(f"error: pod {args.pod} has no containers", file=sys.stderr)
            return 1
        container = containers[0]
        if len(containers) > 1:
            print(f'Defaulted container "{container}" out of: {", ".join(containers)}', file=sys.stderr)
    if container not in containers:
        print(f"error: container {container} is not valid for pod {args.pod}: choose one of {containers}",
              file=sys.stderr)
        return 1
    runs = _runs(folder, container)
    if not runs and not args.follow:
        print(f"error: no logs for container {container} of pod {args.pod}: it has not started, or its image has "
              "no process mapping (simulated pods have no process and no logs)", file=sys.stderr)
        return 1
    if args.previous:
        if len(runs) < 2:
            print(f'error: previous terminated container "{container}" in pod "{args.pod}" not found',
                  file=sys.stderr)
            return 1
        sys.stdout.buffer.write(runs[-2].read_bytes())
        return 0
    if not args.follow:
        sys.stdout.buffer.write(runs[-1].read_bytes())
        return 0
    return _follow(folder, container)


def _follow(folder: Path, container: str) -> int:
    """Print the current run and what it appends; move on to the next run after a restart; end when deleted."""
    current: Path | None = None
    offset = 0
    try:
        while True:
            runs = _runs(folder, container)
            if current is None and runs:
                current = runs[-1]
            if current is not None:
                try:
                    with open(current, "rb") as fh:
                        fh.seek(offset)
                        data = fh.read()
                except FileNotFoundError:
                    return 0  # the pod was deleted
                if data:
                    offset += len(data)
                    sys.stdout.buffer.write(data)
                    sys.stdout.flush()
                elif runs and runs[-1] != current:
                    current, offset = runs[-1], 0
                    continue
            elif not folder.exists():
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0


def cmd_proxy(args: argparse.Namespace, cluster: DevCluster) -> int:
    from devcluster.proxy import ServiceProxy

    kind, _, name = args.service.rpartition("/")
    if kind not in ("", "svc", "service", "services"):
        print(f"error: only services can be proxied (svc/NAME), not {args.service!r}", file=sys.stderr)
        return 2

    def show(backends: list[tuple[str, int]]) -> None:
        listed = ", ".join(f"{ip}:{port}" for ip, port in backends) or "none ready (connections wait)"
        print(f"svc/{name} endpoints: {listed}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    port: int | str | None = int(args.port) if args.port and args.port.isdigit() else args.port
    with ServiceProxy(cluster.api_client(), args.namespace, name, args.local_port, host=args.address,
                      service_port=port, on_change=show) as proxy:
        print(f"Forwarding from {args.address}:{proxy.port} -> svc/{name} (namespace {args.namespace})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()
    return 0
