"""Draw the chart's Grafana dashboard with real data from devcluster, to look at it without a Grafana.

What runs: devcluster, the operator, one DeepSeekDeployment on a tiny model, a client sending chats through its
Service (repeated prompts for cache hits, a rate-limited key for 429s, a rollout half-way so the colors change), and
Prometheus (Debian's `prometheus` package) scraping the model servers exactly as the chart's ServiceMonitor asks:
the scrape job is generated from the ServiceMonitor that `helm template` renders (Service selector, port, path,
podTargetLabels), with Kubernetes service discovery against the devcluster API server, so the series carry the same
labels a prometheus-operator installation gives them. Every panel's queries are sent to Prometheus as Grafana sends
them (`$__rate_interval` and the variables filled in) and drawn with matplotlib, one chart per panel, in the
dashboard's order, into one PNG.

Grafana itself is not on PyPI or in Debian, so this is a drawing of the same queries, not Grafana's rendering.

    apt-get install prometheus; .venv/bin/pip install -e '.[preview]'
    .venv/bin/python -m devcluster.dashboard_preview --out dashboard.png [--minutes 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from devcluster import build
from devcluster.testing.bluegreen import MODEL_NAME, REPO, bench_world, wait_for
from devcluster.testing.ports import free_port

CHART = REPO / "charts" / "deepseek-operator"
NAMESPACE = "preview"
GROUP, VERSION = "deepseek.ai", "v1alpha1"
RATE_INTERVAL = "30s"  # what Grafana sends for $__rate_interval with a 2 s scrape interval and short ranges


def rendered_service_monitor() -> dict[str, Any]:
    """The chart's ServiceMonitor for model servers, as `helm template` renders it with monitoring enabled."""
    out = subprocess.run([str(build.binary("helm")), "template", "rel", str(CHART), "--namespace", "ops",
                          "--set", "monitoring.serviceMonitor.enabled=true",
                          "--set", "monitoring.serviceMonitor.interval=2s"],
                         check=True, capture_output=True, text=True).stdout
    return next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "ServiceMonitor")


def sanitize(label: str) -> str:
    """A Kubernetes label name as Prometheus writes it (prometheus-operator's podTargetLabels do the same)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def scrape_configs(monitor: dict[str, Any], targets_file: Path) -> list[dict[str, Any]]:
    """The scrape jobs prometheus-operator generates for `monitor` (its relabelings of the endpoints role), reading
    their targets from `targets_file` (written by `EndpointsDiscovery` with the same meta labels)."""
    spec = monitor["spec"]
    jobs = []
    for index, endpoint in enumerate(spec["endpoints"]):
        relabel: list[dict[str, Any]] = [
            {"source_labels": [f"__meta_kubernetes_service_label_{sanitize(key)}"], "regex": value, "action": "keep"}
            for key, value in spec["selector"]["matchLabels"].items()]
        relabel += [
            {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": endpoint["port"], "action": "keep"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
        ]
        relabel += [{"source_labels": [f"__meta_kubernetes_pod_label_{sanitize(label)}"],
                     "target_label": sanitize(label)} for label in spec.get("podTargetLabels") or []]
        relabel += [{"source_labels": rule["sourceLabels"], "regex": rule.get("regex", "(.*)"),
                     "action": rule.get("action", "replace")} for rule in endpoint.get("relabelings") or []]
        jobs.append({"job_name": f"serviceMonitor/{monitor['metadata']['name']}/{index}",
                     "scrape_interval": endpoint.get("interval", "2s"),
                     "metrics_path": endpoint.get("path", "/metrics"),
                     "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "2s"}],
                     "relabel_configs": relabel})
    return jobs


class EndpointsDiscovery(threading.Thread):
    """Prometheus's Kubernetes `endpoints` discovery, done here (Debian builds Prometheus without it): every 2 s,
    each Endpoints address of the namespace becomes a target with the `__meta_kubernetes_*` labels that discovery
    would give it, written to a file_sd file."""

    def __init__(self, core: Any, namespace: str, path: Path) -> None:
        super().__init__(daemon=True)
        self.core, self.namespace, self.path = core, namespace, path
        self.stopped = threading.Event()
        self.path.write_text("[]")

    def targets(self) -> list[dict[str, Any]]:
        services = {s.metadata.name: s for s in self.core.list_namespaced_service(self.namespace).items}
        pods = {p.metadata.name: p for p in self.core.list_namespaced_pod(self.namespace).items}
        found = []
        for endpoints in self.core.list_namespaced_endpoints(self.namespace).items:
            service = services.get(endpoints.metadata.name)
            if service is None:
                continue
            base = {"__meta_kubernetes_namespace": self.namespace,
                    "__meta_kubernetes_service_name": service.metadata.name,
                    **{f"__meta_kubernetes_service_label_{sanitize(k)}": v
                       for k, v in (service.metadata.labels or {}).items()}}
            for subset in endpoints.subsets or []:
                for ready, addresses in (("true", subset.addresses), ("false", subset.not_ready_addresses)):
                    for address in addresses or []:
                        pod = pods.get(address.target_ref.name) if address.target_ref else None
                        pod_labels = {f"__meta_kubernetes_pod_label_{sanitize(k)}": v
                                      for k, v in ((pod.metadata.labels or {}) if pod else {}).items()}
                        for port in subset.ports or []:
                            found.append({"targets": [f"{address.ip}:{port.port}"], "labels": {
                                **base, **pod_labels, "__meta_kubernetes_endpoint_port_name": port.name or "",
                                "__meta_kubernetes_endpoint_ready": ready,
                                "__meta_kubernetes_pod_name": pod.metadata.name if pod else ""}})
        return found

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                scratch = self.path.with_suffix(".tmp")
                scratch.write_text(json.dumps(self.targets()))
                scratch.replace(self.path)
            except Exception as exc:  # the API busy for a moment: the previous targets stay
                print(f"discovery: {exc}", file=sys.stderr)
            self.stopped.wait(2)


def grafana_query(expr: str, variables: dict[str, str]) -> str:
    """`expr` as Grafana sends it: built-in intervals and the dashboard's variables replaced."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "2s")
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    return expr


class Traffic:
    """Chats through the Service: one in four repeats an earlier prompt at temperature 0 (a cache hit), one in six
    uses a key limited to one request every few seconds (429s), the rest are fresh prompts."""

    def __init__(self, base_url: str, token: str, limited: str) -> None:
        self.base_url, self.token, self.limited = base_url, token, limited
        self.codes: dict[int, int] = {}
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(3)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60, trust_env=False) as http:
            while not self.stopped.is_set():
                roll = rng.random()
                token = self.limited if roll < 1 / 6 else self.token
                prompt = f"repeat {rng.randrange(3)}" if roll > 0.75 else f"fresh {rng.random()}"
                body = {"model": MODEL_NAME, "max_tokens": rng.choice([4, 8, 16]), "temperature": 0,
                        "messages": [{"role": "user", "content": prompt}]}
                try:
                    code = http.post(f"{self.base_url}/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {token}"}).status_code
                except httpx.HTTPError:
                    code = 0
                self.codes[code] = self.codes.get(code, 0) + 1
                self.stopped.wait(rng.uniform(0.05, 0.3))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(70)


def draw(board: dict[str, Any], series: dict[str, list[tuple[str, list[tuple[float, float]]]]], start: float,
         rollout_at: float | None, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in board["panels"] if p.get("type") != "row"]
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(16, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        lines = series[panel["title"]]
        for legend, points in lines:
            ax.plot([(t - start) / 60 for t, _ in points], [v for _, v in points], label=legend, linewidth=1.3)
        if rollout_at is not None:
            ax.axvline((rollout_at - start) / 60, color="grey", linestyle=":", linewidth=1)
        unit = (panel.get("fieldConfig") or {}).get("defaults", {}).get("unit", "")
        ax.set_title(f"{panel['title']}" + (f"  [{unit}]" if unit else ""), fontsize=10)
        ax.set_xlabel("minutes (dotted: rollout started)", fontsize=8)
        if lines:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="red")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(f"{board['title']} (devcluster, Prometheus {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    figure.tight_layout()
    figure.savefig(out, dpi=90)


def prometheus_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise SystemExit(f"Prometheus exited with {process.returncode}:\n{log.read_text()[-2000:]}")
    try:
        return httpx.get(f"{url}/-/ready", trust_env=False, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def legend_of(metric: dict[str, str], template: str | None) -> str:
    if template:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m[1], ""), template)
    return ",".join(f"{k}={v}" for k, v in sorted(metric.items())) or "value"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--minutes", type=float, default=4.0, help="how long traffic runs (a rollout at half-time)")
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    args = parser.parse_args(argv)
    if not Path(args.prometheus).exists():
        sys.exit("Prometheus is not installed: apt-get install prometheus (or give --prometheus PATH)")
    if importlib.util.find_spec("matplotlib") is None:  # said now, not after minutes of cluster and traffic
        sys.exit("matplotlib is not installed: .venv/bin/pip install -e '.[preview]'")

    from kubernetes import client

    from devcluster.proxy import ServiceProxy

    board = json.loads(next((CHART / "dashboards").glob("*.json")).read_text())
    monitor = rendered_service_monitor()
    with bench_world(NAMESPACE, "dashboard-preview-") as (world, _operator):
        api = world.api_client
        workdir = world.model.parent
        port = free_port()
        discovery = EndpointsDiscovery(client.CoreV1Api(api), NAMESPACE, workdir / "targets.json")
        discovery.start()
        config = {"global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
                  "scrape_configs": scrape_configs(monitor, workdir / "targets.json")}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with open(workdir / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                [args.prometheus, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT)
        prom = f"http://127.0.0.1:{port}"
        try:
            world.create(replicas=2, rollout={"progressDeadlineSeconds": 300, "scaleDownDelaySeconds": 30,
                                              "analysis": {"requests": 3, "windowSeconds": 3, "maxLatencyMs": 20000}})
            world.wait_phase("Completed", timeout=300)
            token = world.create_apikey()
            limited = world.create_apikey("limited", rateLimit={"requestsPerSecond": 0.2, "burst": 1})
            wait_for("Prometheus up", lambda: prometheus_ready(prom, prometheus, workdir / "prometheus.log"), 60)
            start = time.time()
            rollout_at = None
            with ServiceProxy(api, NAMESPACE, "chat") as proxy, Traffic(proxy.url + "/v1", token, limited) as traffic:
                wait_for("a first successful chat", lambda: traffic.codes.get(200), 60)
                time.sleep(args.minutes * 30)
                rollout_at = time.time()
                world.patch({"spec": {"model": {"revision": "v2"}}})
                time.sleep(args.minutes * 30)
            end = time.time()
            print(f"requests by status: {dict(sorted(traffic.codes.items()))}; rollout status: "
                  f"{(world.status().get('rollout') or {}).get('phase')}", flush=True)
            targets = httpx.get(f"{prom}/api/v1/targets", trust_env=False).json()["data"]["activeTargets"]
            print(f"Prometheus targets: {len(targets)} ("
                  f"{sorted({t['labels'].get('service', '?') for t in targets})})", flush=True)
            variables = {"namespace": NAMESPACE, "deployment": "chat"}
            found: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {}
            empty = []
            for panel in board["panels"]:
                if panel.get("type") == "row":
                    continue
                found[panel["title"]] = []
                for target in panel.get("targets") or []:
                    query = grafana_query(target["expr"], variables)
                    reply = httpx.get(f"{prom}/api/v1/query_range", trust_env=False, params={
                        "query": query, "start": start, "end": end, "step": "2"}).json()
                    if reply.get("status") != "success":
                        raise SystemExit(f"panel {panel['title']!r}: Prometheus refused {query!r}: {reply}")
                    for result in reply["data"]["result"]:
                        points = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
                        if points:
                            found[panel["title"]].append((legend_of(result["metric"], target.get("legendFormat")),
                                                          points))
                if not found[panel["title"]]:
                    empty.append(panel["title"])
            draw(board, found, start, rollout_at, args.out)
            print(f"wrote {args.out}: {len(found)} panels, {sum(len(v) for v in found.values())} series"
                  + (f"; no data in: {', '.join(empty)}" if empty else "; every panel has data"))
        finally:
            discovery.stopped.set()
            prometheus.terminate()
            prometheus.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
