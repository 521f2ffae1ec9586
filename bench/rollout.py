"""Blue-green rollout benchmark on devcluster: time from a spec change to traffic switched, and how much of it is the
operator's own overhead (beyond the new pods' start-up and the verification requests), over N rollouts, with a
client sending through the active Service the whole time (failed requests: target 0).

    .venv/bin/python bench/rollout.py [--rollouts 5] [--interval 1s] [--quick]

`--quick` is one rollout: it shows the script still runs end to end (tests/bench/test_bench_quick.py runs it).

Starts its own devcluster, the operator as a subprocess and real deepseek-server processes on a tiny model. Prints
per-rollout timings and the overhead as a share of the switch time (ratios from one run, side by side; no pass/fail).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from devcluster.testing.bluegreen import ContinuousClient, World, bench_world, wait_for


class Timeline:
    """Polls the deployment, its pods and the active Service every 50 ms and notes when each thing is first seen."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.seen: dict[str, float] = {}
        self.revision: str | None = None
        self.color: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def note(self, key: str) -> None:
        self.seen.setdefault(key, time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.world.status()
                rollout = status.get("rollout") or {}
                if self.revision and rollout.get("revision") == self.revision:
                    self.color = rollout.get("color")
                    self.note(f"phase:{rollout.get('phase')}")
                if self.color:
                    pods = self.world.core.list_namespaced_pod(
                        self.world.namespace, label_selector=f"deepseek.ai/color={self.color},"
                                                             f"deepseek.ai/revision={self.revision}").items
                    if pods:
                        self.note("pod-created")
                    if pods and all(any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
                                    for p in pods):
                        self.note("pods-ready")
                    selector = self.world.core.read_namespaced_service("chat", self.world.namespace).spec.selector
                    if selector.get("deepseek.ai/revision") == self.revision:
                        self.note("switched")
            except Exception:  # the API being briefly busy only delays a note
                pass
            self._stop.wait(0.05)

    def start(self, revision: str) -> None:
        self.seen, self.revision, self.color = {"changed": time.monotonic()}, revision, None
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=5)
    parser.add_argument("--interval", default="1s", help="the operator's polling interval while a rollout runs")
    parser.add_argument("--quick", action="store_true", help="one rollout: checks the script runs, measures little")
    args = parser.parse_args()
    if args.quick:
        args.rollouts = 1

    from deepseek_operator.revision import compute_revision

    from devcluster.proxy import ServiceProxy

    with bench_world("bench", "bench-rollout-", {"DEEPSEEK_OPERATOR_ROLLOUT_PROGRESSING_INTERVAL": args.interval}) \
            as (world, operator):
        try:
            world.create(rollout={"progressDeadlineSeconds": 300, "scaleDownDelaySeconds": 0,
                                  "analysis": {"requests": 3, "windowSeconds": 0, "maxLatencyMs": 20000}})
            world.wait_phase("Completed", timeout=300)
            token = world.create_apikey()
            rows: list[dict[str, float]] = []
            timeline = Timeline(world)
            with ServiceProxy(world.api_client, "bench", "chat") as proxy, \
                    ContinuousClient(proxy.url + "/v1", token) as traffic:
                time.sleep(2)
                for index in range(args.rollouts):
                    spec = world.get()["spec"]
                    spec["model"]["revision"] = f"bench-{index}"
                    revision = compute_revision(spec)
                    timeline.start(revision)
                    world.patch({"spec": {"model": {"revision": f"bench-{index}"}}})
                    wait_for("switch", lambda: "switched" in timeline.seen, 300, 0.05)
                    world.wait_phase("Completed", revision=revision, timeout=120)
                    seen = timeline.seen
                    total = seen["switched"] - seen["changed"]
                    startup = seen["pods-ready"] - seen.get("pod-created", seen["changed"])
                    verifying = seen.get("phase:Promoting", seen["switched"]) - seen.get(
                        "phase:Verifying", seen["pods-ready"])
                    rows.append({"total": total, "startup": startup, "verify": max(0.0, verifying),
                                 "overhead": max(0.0, total - startup - max(0.0, verifying))})
                    print(f"rollout {index + 1}: switched after {total:.2f}s = pod start-up {startup:.2f}s + "
                          f"verification {verifying:.2f}s + operator {rows[-1]['overhead']:.2f}s", flush=True)
                    time.sleep(1)
            timeline.stop()
        except AssertionError:  # a wait timed out: show where the rollout stood
            print(f"rollout status: {world.status()}\noperator log (last lines):\n{operator.log_tail()}",
                  file=sys.stderr)
            raise

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print(f"\n{len(rows)} rollouts, polling interval {args.interval}")
    print(f"  spec change -> traffic switched : median {median('total'):.2f}s")
    print(f"  new pods start-up               : median {median('startup'):.2f}s")
    print(f"  verification requests           : median {median('verify'):.2f}s")
    print(f"  operator overhead               : median {median('overhead'):.2f}s "
          f"({median('overhead') / median('total'):.0%} of the switch time)")
    print(f"  client requests during rollouts : {traffic.ok} ok, {len(traffic.failures)} failed (target 0)")
    for failure in traffic.failures[:5]:
        print(f"    {failure}")
    return 0 if not traffic.failures else 1


if __name__ == "__main__":
    sys.exit(main())
