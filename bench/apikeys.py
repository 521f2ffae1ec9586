"""Benchmark: apply N ApiKeys at once to one DeepSeekDeployment and measure how fast the operator serves them.

Reports p50/p99 of apply -> the key's Secret holds a token (what a workload waits for), p50 apply->Ready, how long
until all are Ready, the operator's peak RSS, its API requests and reconciles per new key, and (fairness) how long
work that arrives mid-burst waits: a key of another deployment, a revocation, a DeepSeekDeployment edit. Each is
printed next to its target (p50 <= 1 s, p99 <= 3 s, all Ready <= 15 s per 1,000, RSS <= 200 MiB, <= 3 requests
and exactly 1 reconcile per key, mid-burst work <= 1 s).

API requests are counted twice: by the API server (`apiserver_request_total` from /metrics, less the requests this
script makes itself; watches are not counted) and by the operator itself (its liveness endpoint's `api_requests`
probe); reconciles by the operator (`reconciles` probe; absent in operator versions without it).

    .venv/bin/python bench/apikeys.py                      # starts its own devcluster
    .venv/bin/python bench/apikeys.py --kubeconfig PATH    # uses a running cluster
    .venv/bin/python bench/apikeys.py --quick              # 20 keys: checks the script runs (no targets judged)
    .venv/bin/python bench/apikeys.py --operator-src DIR   # run the operator from another source tree (DIR holds
                                                           # deepseek_operator/, or operator/deepseek_operator/)

The chart's ApiKey admission policy (a MutatingAdmissionPolicy that puts the operator's finalizer on new keys) is
installed for the run's namespace as `helm install` would, from the chart of the source tree that runs the operator
(none for a version whose chart has no such policy); `--no-admission-policy` leaves it out.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config, watch

from devcluster.testing.admission import chart_admission_policy, wait_for_apikey_admission_policy
from devcluster.testing.crds import install_crds
from devcluster.testing.polling import exit_on_sigterm

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION = "deepseek.ai", "v1alpha1"
TARGETS = {"p50_s": 1.0, "p99_s": 3.0, "all_ready_s_per_1000": 15.0, "rss_mib": 200.0, "requests_per_key": 3.0,
           "reconciles_per_key": 1.0, "mid_burst_s": 1.0}
# What a key's issuance touches; the rest (the deployments' pods and Services, their controllers) is counted apart.
APIKEY_RESOURCES = ("apikeys", "apikeys/status", "secrets", "configmaps", "events")
PROBE_MAX_AGE = 10.5  # kopf re-runs the liveness probes at most every 10 s
METRIC_LINE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="([^"]*)"')


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_pythonpath(source: str | None) -> dict[str, str]:
    """PYTHONPATH that makes `python -m deepseek_operator` import from `source` (a directory), or nothing."""
    if not source:
        return {}
    root = Path(source).resolve()
    if not (root / "deepseek_operator").is_dir():
        root = root / "operator"
    if not (root / "deepseek_operator").is_dir():
        raise SystemExit(f"--operator-src {source}: no deepseek_operator/ package in it or in its operator/")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def source_chart(source: str | None) -> Path | None:
    """The chart of the source tree the operator runs from (this repository's when None), if it has one."""
    root = Path(source).resolve() if source else REPO
    for candidate in (root, root.parent):
        if (candidate / "charts" / "deepseek-operator" / "Chart.yaml").is_file():
            return candidate / "charts" / "deepseek-operator"
    return None


def apiserver_requests(api: client.ApiClient) -> Counter[str]:
    """`VERB resource[/subresource]` -> requests served so far, from the API server's own metrics (no watches)."""
    response = api.call_api("/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False,
                            _return_http_data_only=True)
    counts: Counter[str] = Counter()
    for line in response.data.decode().splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        labels = dict(LABEL.findall(match["labels"]))
        if labels.get("verb") in ("WATCH", "CONNECT") or not labels.get("resource"):
            continue
        resource = labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[f"{labels['verb']} {resource}"] += int(float(match["value"]))
    return counts


def operator_probes(url: str) -> dict[str, Any]:
    """The operator's liveness-endpoint probes (empty when it has none or cannot be reached)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.loads(response.read()))
    except (OSError, ValueError):
        return {}


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


class Watcher(threading.Thread):
    """Records (client clock) when each object first meets each condition `check(obj) -> list of labels`.

    `from_now`: only changes from the moment it is made (a watch from the current resourceVersion, resumed from the
    last one seen), instead of a listing of every object first and again at each reconnect (10,000 Secrets each time
    in the at-rest bench)."""

    def __init__(self, list_fn: Any, args: tuple[Any, ...], check: Any, from_now: bool = False) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.args, self.check = list_fn, args, check
        self.seen: dict[tuple[str, str], float] = {}
        self.stopped = threading.Event()
        self.started = threading.Event()
        self.resource_version = self._current_version() if from_now else None

    def _current_version(self) -> str:
        listing = self.list_fn(*self.args, limit=1)
        meta = listing["metadata"] if isinstance(listing, dict) else listing.metadata
        return str(meta["resourceVersion"] if isinstance(meta, dict) else meta.resource_version)

    def first(self, label: str, name: str) -> float | None:
        return self.seen.get((label, name))

    def count(self, label: str) -> int:
        return sum(1 for (kind, _) in self.seen if kind == label)

    def run(self) -> None:
        while not self.stopped.is_set():
            stream = watch.Watch()
            self.started.set()
            resume = ({"resource_version": self.resource_version, "allow_watch_bookmarks": True}
                      if self.resource_version else {})
            try:
                # Plain JSON (deserialize=False): turning each event into the client's model objects costs about a
                # millisecond of this process's CPU, which on a busy machine made the times recorded here lag.
                for event in stream.stream(self.list_fn, *self.args, timeout_seconds=120, deserialize=False,
                                           **resume):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":  # e.g. 410 Gone: resume from now
                        raise RuntimeError(str(obj))
                    if self.resource_version:
                        self.resource_version = (obj.get("metadata") or {}).get("resourceVersion") \
                            or self.resource_version
                    if event["type"] == "BOOKMARK":
                        continue
                    now = time.time()
                    for label in self.check(event["type"], obj):
                        self.seen.setdefault((label, obj["metadata"]["name"]), now)
                    if self.stopped.is_set():
                        return
            except Exception:  # a dropped watch is re-established; setdefault keeps the first time
                if self.stopped.is_set():
                    return
                time.sleep(0.1)
                if self.resource_version:
                    try:
                        self.resource_version = self._current_version()
                    except Exception:
                        time.sleep(1)


def apikey_states(event_type: str, obj: dict[str, Any]) -> list[str]:
    conditions = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
    return [kind for kind in ("Ready", "Revoked") if conditions.get(kind) == "True"]


def secret_states(event_type: str, obj: dict[str, Any]) -> list[str]:
    """"token" once the Secret holds one; "gone" once it is deleted."""
    if event_type == "DELETED":
        return ["gone"]
    return ["token"] if (obj.get("data") or {}).get("api-key") else []


def deployment_states(event_type: str, obj: dict[str, Any]) -> list[str]:
    observed = (obj.get("status") or {}).get("observedGeneration")
    return [f"observed-{observed}"] if observed else []


def run_benchmark(kubeconfig: str, count: int, workers: int, rate: float = 0.0,
                  operator_src: str | None = None, admission: bool = True) -> dict[str, Any]:
    env = {**os.environ, "KUBECONFIG": kubeconfig, **operator_pythonpath(operator_src)}
    kubectl = str(Path(sys.executable).with_name("kubectl"))
    install_crds(kubeconfig)
    api = config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = workers + 4
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    for deployment in ("chat", "other"):  # "other": its key, made mid-burst, must not wait behind chat's
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment", "metadata": {"name": deployment},
            "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:bench"}})
    chart = source_chart(operator_src) if admission else None
    policy = chart_admission_policy(namespace, chart) if chart is not None else ""
    if policy:
        subprocess.run([kubectl, "apply", "-f", "-"], input=policy, text=True, check=True, env=env,
                       capture_output=True)
        try:
            wait_for_apikey_admission_policy(custom, namespace)
        except TimeoutError as exc:
            raise SystemExit(str(exc)) from None

    def apikey_body(name: str, deployment: str, subject: str, environment: str,
                    rate_limit: dict[str, int] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"deploymentRef": {"name": deployment}, "subject": subject, "environment": environment}
        if rate_limit:
            spec["rateLimit"] = rate_limit
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": name}, "spec": spec}

    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    log_path = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
    with log_path.open("wb") as log:
        operator = subprocess.Popen(
            [sys.executable, "-c", "import sys, deepseek_operator; print('operator source:', "
             "deepseek_operator.__file__, flush=True); from deepseek_operator.__main__ import main; "
             "sys.exit(main())", "--namespace", namespace, "--liveness", liveness, "--log-format", "plain"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = RssSampler(operator.pid)
    sampler.start()
    keys = Watcher(custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, "apikeys"), apikey_states)
    secrets = Watcher(core.list_namespaced_secret, (namespace,), secret_states)
    deployments = Watcher(custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, "deepseekdeployments"),
                          deployment_states)
    for watcher in (keys, secrets, deployments):
        watcher.start()
        watcher.started.wait(10)
    own: Counter[str] = Counter()  # this script's requests inside the measured window (watches not counted)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # the issuers are ready: the deployments' status names their signing keys
            ready = [custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", d)
                     .get("status", {}).get("signingKeyId") for d in ("chat", "other")]
            if all(ready):
                break
            time.sleep(0.1)
        # A key Ready before the burst, revoked in the middle of it.
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys",
                                               apikey_body("victim", "chat", "victim", "dev"))
        deadline = time.time() + 60
        while keys.first("Ready", "victim") is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(PROBE_MAX_AGE)  # the operator's probes are then re-run for the baseline below
        probes_before = operator_probes(liveness)
        probes_read = time.time()
        requests_before = apiserver_requests(api)
        applied_at: dict[str, float] = {}
        mid_burst: dict[str, float] = {}
        lock = threading.Lock()

        def disturb() -> None:
            """Work that arrives mid-burst: a key of another deployment, a revocation, a deployment edit."""
            mid_burst["other-key"] = time.time()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys",
                                                   apikey_body("other-key", "other", "other", "prod"))
            mid_burst["revoke"] = time.time()
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", "victim",
                                                  {"spec": {"revoked": True}})
            mid_burst["deployment"] = time.time()
            edited = custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", "other",
                                                           {"spec": {"rateLimit": {"requestsPerSecond": 7}}})
            mid_burst["deployment_generation"] = edited["metadata"]["generation"]
            own.update(["POST apikeys", "PATCH apikeys", "PATCH deepseekdeployments"])

        def create(i: int) -> None:
            limits = {"requestsPerSecond": 1 + i % 7, "burst": 5} if i % 10 == 0 else None  # 1 in 10: own limits
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", apikey_body(
                f"key-{i:05d}", "chat", f"user-{i}", ("dev", "test", "prod")[i % 3], limits))
            applied_at[f"key-{i:05d}"] = time.time()
            with lock:
                own["POST apikeys"] += 1
                if own["POST apikeys"] == count // 2:
                    threading.Thread(target=disturb, daemon=True).start()

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

        def done() -> bool:
            return (all(keys.first("Ready", name) for name in applied_at) and keys.first("Revoked", "victim")
                    is not None and secrets.first("token", "other-key-apikey") is not None
                    and deployments.first(f"observed-{mid_burst.get('deployment_generation')}", "other") is not None)

        while not done() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(max(3.0, probes_read + PROBE_MAX_AGE - time.time()))  # trailing writes; probes re-run
        requests_after = apiserver_requests(api)
        probes_after = operator_probes(liveness)
        ready_at = {name: keys.first("Ready", name) for name in applied_at}
        token_at = {name: secrets.first("token", f"{name}-apikey") for name in applied_at}
        finished = max([t for t in ready_at.values() if t] or [time.time()])
        to_ready = [t - applied_at[name] for name, t in ready_at.items() if t]
        to_token = [t - applied_at[name] for name, t in token_at.items() if t]

        def waited(at: float | None, since: str) -> float | None:
            return round(at - mid_burst[since], 3) if at and since in mid_burst else None

        served = requests_after - requests_before
        served.subtract(own)
        served = Counter({kind: n for kind, n in served.items() if n > 0})
        operator_requests = (Counter(probes_after.get("api_requests") or {})
                             - Counter(probes_before.get("api_requests") or {}))
        request_seconds = (Counter(probes_after.get("api_request_seconds") or {})
                           - Counter(probes_before.get("api_request_seconds") or {}))
        reconciles = (Counter(probes_after.get("reconciles") or {}) - Counter(probes_before.get("reconciles") or {}))
        apikey_reconciles = sum(n for kind, n in reconciles.items() if kind.startswith("ApiKey"))
        configmap = core.read_namespaced_config_map("chat-auth", namespace)
        size = sum(len(k) + len(v.encode()) for k, v in (configmap.data or {}).items())
        size += sum(len(k) + len(base64.b64decode(v)) for k, v in (configmap.binary_data or {}).items())
        limits = json.loads((configmap.data or {}).get("limits.json", "{}"))
        keys_made = count + 1  # and the mid-burst key of the other deployment
        result = {
            "keys": count,
            "finalizer_at_admission": bool(policy),
            "apply_rate_limit": rate or None,
            "ready": len(to_ready),
            "with_token": len(to_token),
            "apply_seconds": round(applied - started, 2),
            "all_ready_seconds": round(finished - started, 2),
            "keys_per_second": round(len(to_ready) / max(finished - started, 1e-9), 1),
            "p50_apply_to_token_s": round(statistics.median(to_token), 3) if to_token else None,
            "p99_apply_to_token_s": round(percentile(to_token, 0.99), 3) if to_token else None,
            "p50_apply_to_ready_s": round(statistics.median(to_ready), 3) if to_ready else None,
            "p99_apply_to_ready_s": round(percentile(to_ready, 0.99), 3) if to_ready else None,
            "mid_burst_other_deployment_key_s": waited(secrets.first("token", "other-key-apikey"), "other-key"),
            "mid_burst_revocation_s": waited(keys.first("Revoked", "victim"), "revoke"),
            "mid_burst_deployment_edit_s": waited(
                deployments.first(f"observed-{mid_burst.get('deployment_generation')}", "other"), "deployment"),
            "apiserver_requests_per_key": round(sum(n for kind, n in served.items()
                                                    if kind.split()[1] in APIKEY_RESOURCES) / keys_made, 2),
            "apiserver_requests_all_per_key": round(sum(served.values()) / keys_made, 2),
            "apiserver_requests_by_kind_per_key": {k: round(n / keys_made, 2) for k, n in sorted(served.items())},
            "operator_requests_per_key": (round(sum(n for kind, n in operator_requests.items()
                                                    if kind.split()[1] in APIKEY_RESOURCES) / keys_made, 2)
                                          if probes_after.get("api_requests") is not None else None),
            "operator_requests_by_kind_per_key": {k: round(n / keys_made, 2)
                                                  for k, n in sorted(operator_requests.items())},
            "operator_request_ms_by_kind": {k: round(1000 * request_seconds[k] / n, 1)
                                            for k, n in sorted(operator_requests.items()) if n},
            "reconciles_per_key": (round(apikey_reconciles / keys_made, 2)
                                   if probes_after.get("reconciles") is not None else None),
            "reconciles_by_kind": dict(reconciles),
            "auth_configmap_bytes": size,
            "auth_limits_entries": len(limits),
            "operator_peak_rss_mib": round(sampler.peak / 2**20, 1),
            "operator_cpu_seconds": round(sampler.cpu_seconds, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "operator_log": str(log_path),
        }
    finally:
        for watcher in (keys, secrets, deployments):
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
        if policy:
            subprocess.run([kubectl, "delete", "--ignore-not-found", "-f", "-"], input=policy, text=True, env=env,
                           capture_output=True)
        # Deleting a thousand Secrets keeps the API server busy: a run after this one must not measure that.
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                core.read_namespace(namespace)
            except client.ApiException as exc:
                if exc.status == 404:
                    break
                raise
            time.sleep(1)
    return result


def report(result: dict[str, Any], judge: bool = True) -> None:
    """The table of results next to the targets; `judge=False` (a quick run) leaves the verdict column out."""
    scale = result["keys"] / 1000

    def at_most(value: float | None, target: float) -> bool:
        return value is not None and value <= target

    mid = TARGETS["mid_burst_s"]
    rows = [
        ("p50 apply->Secret token", f"{result['p50_apply_to_token_s']} s", f"<= {TARGETS['p50_s']} s",
         at_most(result["p50_apply_to_token_s"], TARGETS["p50_s"])),
        ("p99 apply->Secret token", f"{result['p99_apply_to_token_s']} s", f"<= {TARGETS['p99_s']} s",
         at_most(result["p99_apply_to_token_s"], TARGETS["p99_s"])),
        ("p50 apply->Ready", f"{result['p50_apply_to_ready_s']} s", "-", True),
        ("p99 apply->Ready", f"{result['p99_apply_to_ready_s']} s", "-", True),
        (f"all {result['keys']} Ready", f"{result['all_ready_seconds']} s",
         f"<= {TARGETS['all_ready_s_per_1000'] * scale:.3g} s",
         result["all_ready_seconds"] <= TARGETS["all_ready_s_per_1000"] * scale and result["ready"] == result["keys"]),
        ("throughput", f"{result['keys_per_second']} keys/s (apply took {result['apply_seconds']} s)", "-", True),
        # Judged on the operator's own count where it has one (the API server's includes other clients' requests).
        ("API requests / new key", f"{result['apiserver_requests_per_key']} (API server), "
                                   f"{result['operator_requests_per_key']} (operator)",
         f"<= {TARGETS['requests_per_key']:.0f}",
         at_most(result["operator_requests_per_key"] if result["operator_requests_per_key"] is not None
                 else result["apiserver_requests_per_key"], TARGETS["requests_per_key"])),
        ("reconciles / new key", f"{result['reconciles_per_key']}", "== 1",
         result["reconciles_per_key"] == TARGETS["reconciles_per_key"]),
        ("mid-burst: other dep. key", f"{result['mid_burst_other_deployment_key_s']} s", f"<= {mid} s",
         at_most(result["mid_burst_other_deployment_key_s"], mid)),
        ("mid-burst: revocation", f"{result['mid_burst_revocation_s']} s", f"<= {mid} s",
         at_most(result["mid_burst_revocation_s"], mid)),
        ("mid-burst: deployment edit", f"{result['mid_burst_deployment_edit_s']} s", f"<= {mid} s",
         at_most(result["mid_burst_deployment_edit_s"], mid)),
        ("X-auth ConfigMap", f"{result['auth_configmap_bytes'] / 1024:.1f} KiB "
                             f"({result['auth_limits_entries']} limits entries)", "< 1024 KiB",
         result["auth_configmap_bytes"] < 2**20),
        ("operator peak RSS", f"{result['operator_peak_rss_mib']} MiB (CPU {result['operator_cpu_seconds']} s)",
         f"<= {TARGETS['rss_mib']:.0f} MiB", result["operator_peak_rss_mib"] <= TARGETS["rss_mib"]),
    ]
    for name, value, target, ok in rows:
        verdict = ("ok" if ok else "MISSED") if judge else "(not judged)"
        print(f"{name:<27} {value:<44} target {target:<10} {verdict}")
    print("The ApiKey finalizer was put on new keys by " + (
        "the chart's admission policy." if result.get("finalizer_at_admission") else "the operator (one PATCH a key)."))
    print(f"API requests per new key on {', '.join(APIKEY_RESOURCES)} are judged; all requests the API server "
          f"served per key: {result['apiserver_requests_all_per_key']}.")
    print("By kind (API server | operator | operator's mean wait for an answer):")
    by_server, by_operator = result["apiserver_requests_by_kind_per_key"], result["operator_requests_by_kind_per_key"]
    for kind in sorted(set(by_server) | set(by_operator)):
        wait = result["operator_request_ms_by_kind"].get(kind)
        print(f"  {kind:<40} {by_server.get(kind, '-'):<8} {by_operator.get(kind, '-'):<8} "
              f"{'-' if wait is None else f'{wait} ms'}")
    print(f"load average {result['load_average']}")
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="concurrent creates")
    parser.add_argument("--rate", type=float, default=0.0, help="apply at most this many keys/s (0: all at once)")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a devcluster")
    parser.add_argument("--quick", action="store_true", help="20 keys, 4 workers: checks the script runs")
    parser.add_argument("--operator-src", metavar="DIR",
                        help="run the operator from this source tree (holding deepseek_operator/ or operator/)")
    parser.add_argument("--no-admission-policy", dest="admission", action="store_false",
                        help="do not install the chart's ApiKey admission policy (the operator adds the finalizer)")
    args = parser.parse_args()
    exit_on_sigterm()  # a terminated run still stops its devcluster and operator
    if args.quick:
        args.keys, args.workers = 20, 4
    with ExitStack() as stack:
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            from devcluster import DevCluster

            kubeconfig = str(stack.enter_context(DevCluster.from_env()).kubeconfig)
        report(run_benchmark(kubeconfig, args.keys, args.workers, args.rate, args.operator_src, args.admission),
               judge=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
