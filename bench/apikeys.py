"""Benchmark: apply N ApiKeys to one DeepSeekDeployment and measure how fast the operator makes them Ready.

Reports keys/s until all are Ready, p50/p99 of apply->Ready, the size of the `<deployment>-auth` ConfigMap and the
operator's peak RSS, next to the targets (p50 <= 1 s, 1,000 keys <= 60 s, RSS <= 200 MiB).

    .venv/bin/python bench/apikeys.py                      # starts its own devcluster
    .venv/bin/python bench/apikeys.py --kubeconfig PATH    # uses a running cluster
    .venv/bin/python bench/apikeys.py --quick              # 20 keys: checks the script runs (no targets judged)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION = "deepseek.ai", "v1alpha1"
TARGETS = {"p50_s": 1.0, "total_s_per_1000": 60.0, "rss_mib": 200.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class RssSampler(threading.Thread):
    """Peak resident memory of a process, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.cpu_seconds = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
                times = self.process.cpu_times()
                self.cpu_seconds = times.user + times.system
            except psutil.Error:
                return
            time.sleep(0.05)


class ReadyWatcher(threading.Thread):
    """Records when each ApiKey is first seen Ready (client clock)."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str) -> None:
        super().__init__(daemon=True)
        self.custom = custom
        self.namespace = namespace
        self.ready_at: dict[str, float] = {}
        self.stopped = threading.Event()
        self.started = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            stream = watch.Watch()
            self.started.set()
            try:
                for event in stream.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                           self.namespace, "apikeys", timeout_seconds=120):
                    obj = event["object"]
                    conditions = obj.get("status", {}).get("conditions", [])
                    if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                        self.ready_at.setdefault(obj["metadata"]["name"], time.time())
                    if self.stopped.is_set():
                        return
            except Exception:  # a dropped watch is re-established; setdefault keeps the first time
                time.sleep(0.1)


def run_benchmark(kubeconfig: str, count: int, workers: int, rate: float = 0.0) -> dict[str, Any]:
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    kubectl = str(Path(sys.executable).with_name("kubectl"))
    subprocess.run([kubectl, "apply", "-f", str(REPO / "crds")], check=True, env=env, capture_output=True)
    subprocess.run([kubectl, "wait", "--for=condition=Established", "--timeout=60s", "crd/apikeys.deepseek.ai",
                    "crd/deepseekdeployments.deepseek.ai"], check=True, env=env, capture_output=True)
    api = config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = workers + 4
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
        "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:bench"}})

    log_path = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
    with log_path.open("wb") as log:
        operator = subprocess.Popen(
            [sys.executable, "-m", "deepseek_operator", "--namespace", namespace, "--liveness", "none",
             "--log-format", "plain"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = RssSampler(operator.pid)
    sampler.start()
    watcher = ReadyWatcher(custom, namespace)
    watcher.start()
    watcher.started.wait(10)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:  # the issuer is ready: the deployment's status names its signing key
            dsd = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", "chat")
            if dsd.get("status", {}).get("signingKeyId"):
                break
            time.sleep(0.1)
        applied_at: dict[str, float] = {}

        def create(i: int) -> None:
            spec: dict[str, Any] = {"deploymentRef": {"name": "chat"}, "subject": f"user-{i}",
                                    "environment": ("dev", "test", "prod")[i % 3]}
            if i % 10 == 0:  # one key in ten has its own limits: those go into the ConfigMap
                spec["rateLimit"] = {"requestsPerSecond": 1 + i % 7, "burst": 5}
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": f"key-{i:05d}"},
                "spec": spec})
            applied_at[f"key-{i:05d}"] = time.time()

        started = time.time()
        with ThreadPoolExecutor(workers) as pool:
            if rate > 0:  # a steady stream (like a GitOps sync), instead of everything at once
                futures = []
                for i in range(count):
                    time.sleep(max(0.0, started + i / rate - time.time()))
                    futures.append(pool.submit(create, i))
                for future in futures:
                    future.result()
            else:
                list(pool.map(create, range(count)))
        applied = time.time()
        deadline = time.time() + max(120.0, count * 0.3)
        while len(watcher.ready_at) < count and time.time() < deadline:
            time.sleep(0.1)
        finished = max(watcher.ready_at.values()) if watcher.ready_at else time.time()
        latencies = [watcher.ready_at[name] - applied_at[name] for name in applied_at if name in watcher.ready_at]
        configmap = core.read_namespaced_config_map("chat-auth", namespace)
        size = sum(len(k) + len(v.encode()) for k, v in (configmap.data or {}).items())
        size += sum(len(k) + len(base64.b64decode(v)) for k, v in (configmap.binary_data or {}).items())
        limits = json.loads((configmap.data or {}).get("limits.json", "{}"))
        result = {
            "keys": count,
            "apply_rate_limit": rate or None,
            "ready": len(latencies),
            "apply_seconds": round(applied - started, 2),
            "all_ready_seconds": round(finished - started, 2),
            "keys_per_second": round(len(latencies) / max(finished - started, 1e-9), 1),
            "p50_apply_to_ready_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_apply_to_ready_s": round(percentile(latencies, 0.99), 3) if latencies else None,
            "auth_configmap_bytes": size,
            "auth_limits_entries": len(limits),
            "operator_peak_rss_mib": round(sampler.peak / 2**20, 1),
            "operator_cpu_seconds": round(sampler.cpu_seconds, 1),
            "operator_log": str(log_path),
        }
    finally:
        watcher.stopped.set()
        sampler.stopped.set()
        operator.terminate()
        try:
            operator.wait(20)
        except subprocess.TimeoutExpired:
            operator.kill()
        # Keys have finalizers; without the operator, drop them so the namespace can go.
        for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys")["items"]:
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", item["metadata"]["name"],
                                                  {"metadata": {"finalizers": None}})
        core.delete_namespace(namespace)
    return result


def report(result: dict[str, Any], judge: bool = True) -> None:
    """The table of results next to the targets; `judge=False` (a quick run) leaves the verdict column out."""
    scale = result["keys"] / 1000
    rows = [
        ("p50 apply->Ready", f"{result['p50_apply_to_ready_s']} s", f"<= {TARGETS['p50_s']} s",
         (result["p50_apply_to_ready_s"] or 1e9) <= TARGETS["p50_s"]),
        ("p99 apply->Ready", f"{result['p99_apply_to_ready_s']} s", "-", True),
        (f"all {result['keys']} Ready", f"{result['all_ready_seconds']} s",
         f"<= {TARGETS['total_s_per_1000'] * scale:.0f} s",
         result["all_ready_seconds"] <= TARGETS["total_s_per_1000"] * scale and result["ready"] == result["keys"]),
        ("throughput", f"{result['keys_per_second']} keys/s", "-", True),
        ("X-auth ConfigMap", f"{result['auth_configmap_bytes'] / 1024:.1f} KiB "
                             f"({result['auth_limits_entries']} limits entries)", "< 1024 KiB",
         result["auth_configmap_bytes"] < 2**20),
        ("operator peak RSS", f"{result['operator_peak_rss_mib']} MiB", f"<= {TARGETS['rss_mib']:.0f} MiB",
         result["operator_peak_rss_mib"] <= TARGETS["rss_mib"]),
    ]
    for name, value, target, ok in rows:
        verdict = ("ok" if ok else "MISSED") if judge else "(not judged)"
        print(f"{name:<22} {value:<34} target {target:<12} {verdict}")
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="concurrent creates")
    parser.add_argument("--rate", type=float, default=0.0, help="apply at most this many keys/s (0: all at once)")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a devcluster")
    parser.add_argument("--quick", action="store_true", help="20 keys, 4 workers: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.keys, args.workers = 20, 4
    with ExitStack() as stack:
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            from devcluster import DevCluster

            kubeconfig = str(stack.enter_context(DevCluster.from_env()).kubeconfig)
        report(run_benchmark(kubeconfig, args.keys, args.workers, args.rate), judge=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
