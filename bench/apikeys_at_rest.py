"""Benchmark: N ApiKeys at rest on one DeepSeekDeployment, and an operator restart over them.

Creates N keys (default 10,000), waits until all are Ready, then measures over an idle window the operator's API
requests per second (its own count, from its liveness endpoint's `api_requests` probe: everything it sent, and the
part sent for ApiKeys, i.e. by its ApiKey pools and Secret watch, where the operator reports pools) and its resident
memory; then restarts the operator and times until every key has been re-verified (its `reconciles` probe counts N
ApiKey reconciles), counting what the new process wrote to Secrets and ConfigMaps, and its memory once it rests again.
Each figure is printed next to its target: <= 5 requests/s at rest, RSS <= 300 MiB (after the keys' creation and
after the restart), restart <= 60 s with 0 Secret/ConfigMap writes.

Then a signing-key rotation over the N keys: the restarted operator is given a rotation interval that falls due a
while after its restart, and while the new key is published a stream of new keys (10/s) is applied. It reports what
the rotation made the operator do (ApiKey reconciles, requests, writes) and the new keys' apply -> token latency,
which should stay at the burst target (p50 <= 1 s) however many keys the deployment holds.

kopf re-runs the probes at most every 10 s, so the restart time is known to within about 10 s.

    .venv/bin/python bench/apikeys_at_rest.py                          # 10,000 keys, own devcluster
    .venv/bin/python bench/apikeys_at_rest.py --keys 2000 --idle 60
    .venv/bin/python bench/apikeys_at_rest.py --before-src DIR         # then the same with the operator from DIR
                                                                       # ("before"), on the same devcluster
    .venv/bin/python bench/apikeys_at_rest.py --quick                  # 20 keys, 20 s idle (no targets judged)
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apikeys import RssSampler, Watcher, free_port, operator_probes, operator_pythonpath, secret_states

from devcluster.testing.crds import install_crds
from devcluster.testing.polling import exit_on_sigterm
from devcluster.testing.processes import stop_process

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION = "deepseek.ai", "v1alpha1"
TARGETS = {"requests_per_s": 5.0, "rss_mib": 300.0, "restart_s": 60.0, "restart_writes": 0, "rotation_p50_s": 1.0}
PROBE_MAX_AGE = 10.5  # kopf re-runs the liveness probes at most every 10 s
APIKEY_POOLS = ("apikey", "issue", "secret-watch")
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")


class Operator:
    """The operator as a process scoped to one namespace, from the source tree `source` (None: this checkout)."""

    def __init__(self, kubeconfig: str, namespace: str, source: str | None) -> None:
        self.env = {**os.environ, "KUBECONFIG": kubeconfig, **operator_pythonpath(source)}
        self.namespace = namespace
        self.url = f"http://127.0.0.1:{free_port()}/healthz"
        self.log_path = Path(tempfile.mkstemp(prefix="bench-at-rest-operator-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: RssSampler | None = None
        self.read_at = 0.0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys, deepseek_operator; print('operator source:', "
                 "deepseek_operator.__file__, flush=True); from deepseek_operator.__main__ import main; "
                 "sys.exit(main())", "--namespace", self.namespace, "--liveness", self.url, "--log-format", "plain"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.start()
        self.read_at = 0.0

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stopped.set()
        stop_process(self.proc, grace=30)

    def rss_mib(self) -> float:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def probes(self) -> dict[str, Any]:
        """Every probe, run afresh (waits until kopf's cached answer is old enough)."""
        time.sleep(max(0.0, self.read_at + PROBE_MAX_AGE - time.time()))
        answer = operator_probes(self.url)
        if answer:
            self.read_at = time.time()
        return answer


def apikey_requests(probes: dict[str, Any]) -> int | None:
    """Requests sent by the ApiKey pools and the Secret watch (None: an operator that does not report pools)."""
    pools = probes.get("api_requests_by_pool")
    if pools is None:
        return None
    return sum(n for kind, n in pools.items() if kind.split()[0] in APIKEY_POOLS)


def count_ready(custom: client.CustomObjectsApi, namespace: str) -> int:
    ready, token = 0, None
    while True:
        page = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", limit=500,
                                                    **({"_continue": token} if token else {}))
        for item in page["items"]:
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in (item.get("status") or {}).get("conditions") or []):
                ready += 1
        token = page["metadata"].get("continue")
        if not token:
            return ready


def published_kids(core: client.CoreV1Api, namespace: str, deployment: str = "chat") -> list[str]:
    """The kids in the deployment's JWKS (auth ConfigMap index, plain or gzip form)."""
    configmap = core.read_namespaced_config_map(f"{deployment}-auth", namespace)
    if configmap.data and "jwks.json" in configmap.data:
        jwks = json.loads(configmap.data["jwks.json"])
    elif configmap.binary_data and "jwks.json.gz" in configmap.binary_data:
        jwks = json.loads(gzip.decompress(base64.b64decode(configmap.binary_data["jwks.json.gz"])))
    else:
        return []
    return [str(key.get("kid")) for key in jwks.get("keys", [])]


def rotation_phase(custom: client.CustomObjectsApi, core: client.CoreV1Api, namespace: str, operator: Operator,
                   rotate_at: float, new_keys: int) -> dict[str, Any]:
    """While the restarted operator publishes a new signing key (due at `rotate_at`), apply `new_keys` keys at
    10/s; what the rotation cost and how long the new keys waited."""
    kids_before = published_kids(core, namespace)
    time.sleep(max(0.0, rotate_at - 15 - time.time()))
    probes_before = operator.probes()
    time.sleep(max(0.0, rotate_at - 3 - time.time()))
    tokens = Watcher(core.list_namespaced_secret, (namespace,), secret_states, from_now=True)
    tokens.start()
    applied_at: dict[str, float] = {}
    published_at: list[float] = []

    def watch_jwks() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not published_at:
            if len(published_kids(core, namespace)) > len(kids_before):
                published_at.append(time.time())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_jwks, daemon=True)
    watcher.start()
    started = time.time()
    for i in range(new_keys):  # 10/s from 3 s before the rotation is due
        time.sleep(max(0.0, started + i / 10 - time.time()))
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": f"rot-{i:05d}"},
            "spec": {"deploymentRef": {"name": "chat"}, "subject": f"rotation-{i}", "environment": "dev"}})
        applied_at[f"rot-{i:05d}"] = time.time()
    deadline = time.time() + 120
    def token_at(name: str) -> float | None:
        return tokens.first("token", f"{name}-apikey")

    while sum(1 for name in applied_at if token_at(name)) < new_keys and time.time() < deadline:
        time.sleep(0.2)
    watcher.join(timeout=max(0.0, deadline - time.time()))
    time.sleep(20)  # the rotation's wake-ups, if any, run on
    probes_after = operator.probes()
    tokens.stopped.set()
    reconciles = Counter(probes_after.get("reconciles") or {}) - Counter(probes_before.get("reconciles") or {})
    requests = Counter(probes_after.get("api_requests") or {}) - Counter(probes_before.get("api_requests") or {})
    waited = [seen - at for name, at in applied_at.items() if (seen := token_at(name)) is not None]
    writes = {kind: n for kind, n in requests.items() if kind.split()[0] in WRITE_VERBS}
    return {
        "rotation_published": bool(published_at),
        "rotation_published_after_restart_s": None,
        "rotation_new_keys": new_keys, "rotation_new_keys_with_token": len(waited),
        "rotation_p50_s": round(statistics.median(waited), 3) if waited else None,
        "rotation_p99_s": round(sorted(waited)[min(len(waited) - 1, round(0.99 * (len(waited) - 1)))], 3)
        if waited else None,
        "rotation_reconciles": dict(reconciles.most_common()),
        "rotation_requests": sum(requests.values()),
        "rotation_writes": dict(sorted(writes.items())),
        "rotation_window_s": round(time.time() - started, 1),
        "_published_at": published_at[0] if published_at else None,
    }


def run_phase(label: str, kubeconfig: str, count: int, idle: float, workers: int,
              source: str | None, rotate_after: float = 120.0, rotation_keys: int = 300) -> dict[str, Any]:
    api = config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = workers + 4
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    namespace = f"rest-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
        "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:bench"}})
    deployment_created = time.time()  # its first signing key signs from its first reconcile, a moment later
    operator = Operator(kubeconfig, namespace, source)
    operator.start()
    result: dict[str, Any] = {"phase": label, "keys": count, "operator_source": source or "this checkout"}
    try:
        started = time.time()

        def create(i: int) -> None:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": f"key-{i:05d}"},
                "spec": {"deploymentRef": {"name": "chat"}, "subject": f"user-{i}",
                         "environment": ("dev", "test", "prod")[i % 3]}})

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(create, range(count)))
        result["create_s"] = round(time.time() - started, 1)
        deadline = time.time() + max(300.0, count * 0.2)
        ready = 0
        while time.time() < deadline:
            ready = count_ready(custom, namespace)
            if ready >= count:
                break
            time.sleep(5)
        result["ready"] = ready
        result["all_ready_s"] = round(time.time() - started, 1)
        print(f"[{label}] {ready}/{count} keys Ready after {result['all_ready_s']} s", file=sys.stderr, flush=True)

        time.sleep(15)  # trailing writes of the burst
        before = operator.probes()
        idle_started = time.time()
        time.sleep(idle)
        after = operator.probes()
        window = time.time() - idle_started
        sent = Counter(after.get("api_requests") or {}) - Counter(before.get("api_requests") or {})
        result["idle_window_s"] = round(window, 1)
        result["idle_requests_per_s"] = round(sum(sent.values()) / window, 3)
        keys_before, keys_after = apikey_requests(before), apikey_requests(after)
        result["idle_apikey_requests_per_s"] = (round((keys_after - keys_before) / window, 3)
                                                if keys_before is not None and keys_after is not None else None)
        result["idle_requests"] = dict(sent.most_common())
        result["rss_at_rest_mib"] = round(operator.rss_mib(), 1)
        assert operator.sampler is not None
        result["rss_peak_mib"] = round(operator.sampler.peak / 2**20, 1)

        operator.stop()
        restarted = time.time()
        # The restarted operator rotates the signing key `rotate_after` seconds from now (its first key is older).
        rotate_at = restarted + rotate_after
        operator.env["DEEPSEEK_OPERATOR_SIGNING_KEY_ROTATION"] = f"{int(rotate_at - deployment_created) + 1}s"
        operator.start()
        verified_at = None
        answer: dict[str, Any] = {}
        deadline = restarted + max(600.0, count * 0.1)
        while time.time() < deadline:
            answer = operator.probes() or answer
            if (answer.get("reconciles") or {}).get("ApiKey", 0) >= count:
                verified_at = time.time()
                break
            time.sleep(0.5)
        time.sleep(PROBE_MAX_AGE)
        answer = operator.probes() or answer
        requests = Counter(answer.get("api_requests") or {})
        writes = {kind: n for kind, n in requests.items()
                  if kind.split()[0] in WRITE_VERBS and kind.split()[1] in ("secrets", "configmaps")}
        result["restart_verified_s"] = round(verified_at - restarted, 1) if verified_at else None
        result["restart_apikey_reconciles"] = (answer.get("reconciles") or {}).get("ApiKey", 0)
        result["restart_secret_configmap_writes"] = sum(writes.values())
        result["restart_status_writes"] = requests["PUT apikeys/status"]
        result["restart_get_secrets"] = requests["GET secrets"]
        result["restart_requests"] = sum(requests.values())
        result["rss_after_restart_mib"] = round(operator.rss_mib(), 1)
        if rotation_keys:
            rotation = rotation_phase(custom, core, namespace, operator, rotate_at, rotation_keys)
            published_at = rotation.pop("_published_at")
            rotation["rotation_published_after_restart_s"] = (round(published_at - restarted, 1) if published_at
                                                              else None)
            result.update(rotation)
    finally:
        operator.stop()
        print(f"[{label}] operator log: {operator.log_path}", file=sys.stderr, flush=True)
    return result


def report(results: list[dict[str, Any]], judge: bool) -> None:
    def mark(value: float | None, target: float) -> str:
        if not judge:
            return "(not judged)"
        return "MISSED" if value is None or value > target else "ok"

    for r in results:
        print(f"\n== {r['phase']}: {r['ready']}/{r['keys']} keys Ready in {r['all_ready_s']} s "
              f"(operator: {r['operator_source']})")
        print(f"  API requests/s at rest (all)       {r['idle_requests_per_s']:>9}   target <= "
              f"{TARGETS['requests_per_s']:g}  {mark(r['idle_requests_per_s'], TARGETS['requests_per_s'])}")
        print(f"  API requests/s at rest (ApiKeys)   {r['idle_apikey_requests_per_s']!s:>9}   (pools apikey, issue, "
              "secret-watch; None: not reported)")
        print(f"  operator RSS at rest (MiB)         {r['rss_at_rest_mib']:>9}   target <= {TARGETS['rss_mib']:g}  "
              f"{mark(r['rss_at_rest_mib'], TARGETS['rss_mib'])}")
        print(f"  operator peak RSS (MiB)            {r['rss_peak_mib']:>9}   (creation burst included)")
        print(f"  restart: all keys re-verified (s)  {r['restart_verified_s']!s:>9}   target <= "
              f"{TARGETS['restart_s']:g}  {mark(r['restart_verified_s'], TARGETS['restart_s'])}")
        print(f"  restart: Secret/ConfigMap writes   {r['restart_secret_configmap_writes']:>9}   target "
              f"{TARGETS['restart_writes']}  "
              f"{mark(r['restart_secret_configmap_writes'], TARGETS['restart_writes'])}")
        print(f"  restart: RSS at rest after (MiB)   {r['rss_after_restart_mib']:>9}   target <= "
              f"{TARGETS['rss_mib']:g}  {mark(r['rss_after_restart_mib'], TARGETS['rss_mib'])}  (once the "
              "re-verification is over)")
        print(f"  restart: ApiKey status writes      {r['restart_status_writes']:>9}")
        print(f"  restart: GET secrets               {r['restart_get_secrets']:>9}")
        print(f"  restart: all API requests          {r['restart_requests']:>9}")
        print(f"  idle window ({r['idle_window_s']} s) requests: {r['idle_requests']}")
        if "rotation_p50_s" in r:
            print(f"  signing-key rotation: new key published {r['rotation_published_after_restart_s']} s after the "
                  f"restart ({'yes' if r['rotation_published'] else 'NOT SEEN'}); {r['rotation_new_keys']} new keys "
                  f"at 10/s over {r['rotation_window_s']} s")
            print(f"    new keys apply->token p50 (s)    {r['rotation_p50_s']!s:>9}   target <= "
                  f"{TARGETS['rotation_p50_s']:g}  {mark(r['rotation_p50_s'], TARGETS['rotation_p50_s'])}  "
                  f"(p99 {r['rotation_p99_s']} s; {r['rotation_new_keys_with_token']} with a token)")
            print(f"    reconciles in the window         {r['rotation_reconciles']}")
            print(f"    requests in the window           {r['rotation_requests']:>9}   writes {r['rotation_writes']}")
    print(json.dumps(results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=120.0, help="idle window, seconds")
    parser.add_argument("--workers", type=int, default=16, help="concurrent creates")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a devcluster")
    parser.add_argument("--before-src", metavar="DIR",
                        help="after this checkout's run, run the same measurement with the operator from DIR "
                             "(holding deepseek_operator/ or operator/), e.g. `git archive HEAD operator | tar -x -C "
                             "DIR`")
    parser.add_argument("--rotate-after", type=float, default=120.0,
                        help="seconds from the restart to the signing-key rotation (after the keys are re-verified)")
    parser.add_argument("--rotation-keys", type=int, default=300,
                        help="new keys applied at 10/s around the rotation (0: no rotation phase)")
    parser.add_argument("--quick", action="store_true", help="20 keys, 20 s idle: checks the script runs")
    args = parser.parse_args()
    exit_on_sigterm()  # a terminated run still stops its devcluster and operator
    rotate_after, rotation_keys = args.rotate_after, args.rotation_keys
    if args.quick:
        args.keys, args.idle, args.workers = 20, 20.0, 4
        rotate_after, rotation_keys = 40.0, 50
    with ExitStack() as stack:
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            from devcluster import DevCluster
            from devcluster.cluster import ClusterConfig

            cluster = stack.enter_context(DevCluster(ClusterConfig(name=f"rest-{os.getpid()}", nodes=1)))
            kubeconfig = str(cluster.kubeconfig)
        install_crds(kubeconfig)
        # This checkout first: if the run is cut short, its figures are the ones printed. (The first phase's keys
        # stay in the API server, unwatched, while the second runs.)
        results = [run_phase("after" if args.before_src else "this checkout", kubeconfig, args.keys, args.idle,
                             args.workers, None, rotate_after, rotation_keys)]
        if args.before_src:
            report(results, judge=not args.quick)
            results.append(run_phase("before", kubeconfig, args.keys, args.idle, args.workers, args.before_src,
                                     rotate_after, rotation_keys))
        report(results, judge=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
