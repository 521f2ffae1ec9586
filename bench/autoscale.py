"""Autoscaling benchmark on devcluster: a ramp of concurrent streams (1 -> peak -> 1) through the active Service, and
how long the replicas take to follow it, split into the stabilization window, the operator's decision and the new
pods' start-up; failed requests (target 0) counted over the whole ramp.

    .venv/bin/python bench/autoscale.py [--peak 16] [--max-replicas 3] [--up-window 5] [--down-window 20]
                                        [--interval 1s] [--quick]

`--quick` is a smaller ramp (8 streams, target 2 per replica, 2 replicas, a 10 s down-window): it shows the script
still runs end to end (tests/bench/test_bench_quick.py runs it).

Starts its own devcluster, the operator as a subprocess and real deepseek-server processes on a tiny model. Prints
the times and each part's share of them (from one run, side by side; no pass/fail).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from devcluster.testing.bluegreen import World, bench_world, wait_for
from devcluster.testing.load import StreamLoad


class Watch:
    """Polls the deployment every 100 ms and notes when the autoscaler's decision and the ready count first reach
    a value after `start`."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.world.status()
                desired = (status.get("autoscaling") or {}).get("desiredReplicas")
                pods = [pod for pod in self.world.core.list_namespaced_pod(
                    self.world.namespace, label_selector="deepseek.ai/deployment=chat").items
                    if pod.metadata.deletion_timestamp is None]
                self.seen.setdefault(f"desired:{desired}", time.monotonic())
                self.seen.setdefault(f"ready:{status.get('readyReplicas')}", time.monotonic())
                self.seen.setdefault(f"pods:{len(pods)}", time.monotonic())
            except Exception:  # the API being briefly busy only delays a note
                pass
            self._stop.wait(0.1)

    def start(self) -> None:
        self.seen = {}
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", type=int, default=16, help="concurrent streams at the top of the ramp")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target", type=int, default=4, help="requests in flight per replica")
    parser.add_argument("--up-window", type=int, default=5, help="scale-up stabilization window (s)")
    parser.add_argument("--down-window", type=int, default=20, help="scale-down stabilization window (s)")
    parser.add_argument("--interval", default="1s", help="the operator's autoscaling look interval")
    parser.add_argument("--quick", action="store_true", help="a small ramp: checks the script runs, measures little")
    args = parser.parse_args()
    if args.quick:
        # 2 in flight per replica: 8 streams ask for the 2 replicas even when a loaded client keeps only 3 in flight
        args.peak, args.max_replicas, args.down_window, args.target = 8, 2, 10, 2

    from devcluster.proxy import ServiceProxy

    results: dict[str, Any] = {}
    with bench_world("bench", "bench-autoscale-", {"DEEPSEEK_OPERATOR_AUTOSCALE_INTERVAL": args.interval}) \
            as (world, operator):
        try:
            world.create(server={"precision": "fp32", "maxNewTokens": 48, "maxBatchSize": 8,
                                 "shutdownGraceSeconds": 30},
                         autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": args.max_replicas,
                                      "targetPerReplica": args.target,
                                      "scaleUp": {"stabilizationWindowSeconds": args.up_window},
                                      "scaleDown": {"stabilizationWindowSeconds": args.down_window}})
            world.wait_phase("Completed", timeout=300)
            token = world.create_apikey()
            top = min(args.max_replicas, -(-args.peak // args.target))
            watch = Watch(world)
            with ServiceProxy(world.api_client, "bench", "chat") as proxy, \
                    StreamLoad(proxy.url + "/v1", token, workers=args.peak) as load:
                load.set_concurrency(1)
                wait_for("answers at one stream", lambda: load.answered() >= 3, 120)
                watch.start()
                began = time.monotonic()
                load.set_concurrency(args.peak)
                wait_for(f"{top} ready replicas", lambda: f"ready:{top}" in watch.seen, 600, 0.1)
                up = dict(watch.seen)
                results["up"] = {"decided": up[f"desired:{top}"] - began, "ready": up[f"ready:{top}"] - began}
                print(f"ramp 1 -> {args.peak} streams: decided {top} replicas after {results['up']['decided']:.1f}s, "
                      f"{top} ready after {results['up']['ready']:.1f}s", flush=True)
                watch.start()
                began = time.monotonic()
                load.set_concurrency(1)
                wait_for("one pod left", lambda: "pods:1" in watch.seen, 600, 0.1)
                down = dict(watch.seen)
                results["down"] = {"decided": down["desired:1"] - began, "gone": down["pods:1"] - began}
                print(f"ramp {args.peak} -> 1 streams: decided 1 replica after {results['down']['decided']:.1f}s, "
                      f"down to 1 pod after {results['down']['gone']:.1f}s", flush=True)
                answered = load.answered()
                wait_for("answers on the remaining pod", lambda: load.answered() >= answered + 3, 120)
            watch.stop()
        except AssertionError:  # a wait timed out: show where it stood
            print(f"status: {world.status()}\noperator log (last lines):\n{operator.log_tail()}", file=sys.stderr)
            raise

    up, down = results["up"], results["down"]
    print(f"\nramp 1 -> {args.peak} -> 1 streams, target {args.target} in flight per replica, max {args.max_replicas} "
          f"replicas, look interval {args.interval}")
    print(f"  time to scale up   : {up['ready']:.1f}s = up-window {args.up_window}s + decision "
          f"{max(0.0, up['decided'] - args.up_window):.1f}s + pod start-up {up['ready'] - up['decided']:.1f}s "
          f"(window {args.up_window / up['ready']:.0%} of it)")
    print(f"  time to scale down : {down['gone']:.1f}s = down-window {args.down_window}s + decision "
          f"{max(0.0, down['decided'] - args.down_window):.1f}s + pods marked for removal "
          f"{down['gone'] - down['decided']:.1f}s (they drain their streams after that) "
          f"(window {args.down_window / down['gone']:.0%} of it)")
    print(f"  requests           : {load.ok} ok, {len(load.failures)} failed (target 0)")
    for failure in load.failures[:5]:
        print(f"    {failure}")
    return 0 if not load.failures else 1


if __name__ == "__main__":
    sys.exit(main())
