"""The chart's Grafana dashboard: rendered for the Grafana sidecar only when asked, every PromQL expression (its
panels, its variables and the PrometheusRule's alerts) parses, and every metric they name is one a running model
server exports on /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_chart import CHART, render

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# What Grafana puts in place of its built-in variables before it sends a query.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")
# Labels Prometheus itself (and the ServiceMonitor's podTargetLabels) put on every scraped series.
TARGET_LABELS = {"namespace", "service", "pod", "job", "instance", "endpoint", "container"}


def dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panel_queries(board: dict[str, Any]) -> dict[str, str]:
    """'panel title / refId' -> PromQL of every panel target."""
    return {f"{panel['title']} / {target['refId']}": target["expr"]
            for panel in board["panels"] for target in panel.get("targets") or []}


def variable_selectors(board: dict[str, Any]) -> dict[str, str]:
    """'variable name' -> the series selector inside its label_values(...) query."""
    found = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.match(variable["definition"])
        assert match, f"variable {variable['name']}: {variable['definition']!r} is not label_values(SELECTOR, LABEL)"
        found[variable["name"]] = match["selector"]
    return found


def as_sent(expr: str) -> str:
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    return expr


def rule_expressions(docs: list[dict[str, Any]]) -> dict[str, str]:
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
    promql_parser.walk(promql_parser.parse(as_sent(expr)), visit)
    return names


@pytest.fixture(scope="module")
def monitoring_docs() -> list[dict[str, Any]]:
    return render("monitoring.dashboard.enabled=true", "monitoring.prometheusRule.enabled=true",
                  "monitoring.serviceMonitor.enabled=true")


def all_expressions(docs: list[dict[str, Any]]) -> dict[str, str]:
    expressions = {f"alert {name}": expr for name, expr in rule_expressions(docs).items()}
    for path in DASHBOARDS:
        board = dashboard(path)
        expressions.update({f"{path.name}: {where}": expr for where, expr in panel_queries(board).items()})
        expressions.update({f"{path.name}: variable {name}": selector
                            for name, selector in variable_selectors(board).items()})
    return expressions


def test_dashboard_configmap_is_off_by_default_and_labelled_for_the_grafana_sidecar(monitoring_docs) -> None:
    assert DASHBOARDS, "no dashboard in charts/deepseek-operator/dashboards"
    assert not [d for d in render() if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    maps = [d for d in monitoring_docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(maps) == len(DASHBOARDS)
    for configmap, path in zip(sorted(maps, key=lambda d: d["metadata"]["name"]), DASHBOARDS, strict=True):
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["namespace"] == "ops"
        assert json.loads(configmap["data"][path.name]) == dashboard(path)
    moved = render("monitoring.dashboard.enabled=true", "monitoring.dashboard.namespace=grafana",
                   "monitoring.dashboard.annotations.grafana_folder=LLM")
    configmap = next(d for d in moved if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"])
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    # the sidecar's label replaced by another, or removed (a sidecar told to look elsewhere): still valid YAML
    unset = "monitoring.dashboard.labels.grafana_dashboard=null"
    for labels, expected in (((unset, "monitoring.dashboard.labels.team=ml"), {"team": "ml"}), ((unset,), {})):
        relabelled = render("monitoring.dashboard.enabled=true", *labels)
        [configmap] = [d for d in relabelled if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(
            "-deepseek-servers")]
        own = {k: v for k, v in configmap["metadata"]["labels"].items() if not k.startswith("app.kubernetes.io/")
               and k != "helm.sh/chart"}
        assert own == expected, configmap["metadata"]["labels"]


def test_dashboard_covers_what_operators_watch() -> None:
    board = dashboard(CHART / "dashboards" / "deepseek-servers.json")
    names = set().union(*(metric_names(expr) for expr in panel_queries(board).values()))
    for wanted in ("deepseek_api_requests_total", "deepseek_api_errors_total",
                   "deepseek_api_request_duration_seconds_bucket", "deepseek_time_to_first_token_seconds_bucket",
                   "deepseek_generated_tokens_total", "deepseek_batch_size_bucket", "deepseek_queue_depth",
                   "deepseek_ratelimit_rejections_total", "deepseek_cache_hits_total", "deepseek_cache_misses_total"):
        assert wanted in names, f"no panel shows {wanted}"
    assert {"p50", "p95"} <= {t["legendFormat"].split()[0] for p in board["panels"] for t in p.get("targets") or []}


def test_every_expression_parses_and_the_error_panel_is_the_alerts_expression(monitoring_docs) -> None:
    expressions = all_expressions(monitoring_docs)
    for where, expr in expressions.items():
        try:
            promql_parser.parse(as_sent(expr))
        except ValueError as exc:
            pytest.fail(f"{where}: {expr!r} does not parse: {exc}")
    alert = promql_parser.parse(rule_expressions(monitoring_docs)["DeepSeekApiErrorRateHigh"])
    assert isinstance(alert, promql_parser.BinaryExpr) and isinstance(alert.rhs, promql_parser.NumberLiteral)
    board = dashboard(CHART / "dashboards" / "deepseek-servers.json")
    panel = next(p for p in board["panels"] if p["title"].startswith("Error rate"))
    without_filters = (panel["targets"][0]["expr"]
                       .replace('namespace=~"$namespace", deepseek_ai_deployment=~"$deployment"', "")
                       .replace("{, ", "{").replace(", }", "}").replace("{}", ""))
    assert str(promql_parser.parse(without_filters)) == str(alert.lhs)


def test_panels_count_each_pod_once_across_a_color_switch() -> None:
    """A pod is scraped once per Service that selects it (active and preview), and the `service` label of its series
    changes when traffic switches colors. Summed by Service, a rollout showed as a dip in every rate panel (seen by
    drawing the panels with `python -m devcluster.dashboard_preview`). Panels other than the alert's own expression
    select by the pod's deployment label and keep one series per pod before summing; so do the alerts, which
    grouped by Service fired twice for every incident (once for `<name>-preview`)."""
    board = dashboard(CHART / "dashboards" / "deepseek-servers.json")
    for where, expr in panel_queries(board).items():
        assert "service=" not in expr, f"{where} selects by Service: {expr}"
        assert expr.count("rate(") == expr.count("max without (service, job) (rate("), \
            f"{where} sums a rate without first taking one series per pod: {expr}"


def test_alerts_count_each_pod_once_and_name_the_deployment(monitoring_docs) -> None:
    rule = next(d for d in monitoring_docs if d["kind"] == "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            expr = alert["expr"]
            assert "service" not in expr.replace("max without (service, job)", ""), f"{alert['alert']}: {expr}"
            assert expr.count("rate(") == expr.count("max without (service, job) (rate("), alert["alert"]
            assert "by (namespace, deepseek_ai_deployment" in expr, alert["alert"]
            assert "$labels.deepseek_ai_deployment" in alert["annotations"]["summary"], alert["alert"]


def test_color_and_deployment_labels_come_from_the_service_monitor(monitoring_docs) -> None:
    monitor = next(d for d in monitoring_docs if d["kind"] == "ServiceMonitor")
    provided = {re.sub(r"[^a-zA-Z0-9_]", "_", label) for label in monitor["spec"]["podTargetLabels"]}
    text = json.dumps([dashboard(path) for path in DASHBOARDS])
    used = set(re.findall(r"deepseek_ai_[a-z_]+", text))
    assert used and used <= provided, f"{sorted(used - provided)} are not podTargetLabels of the ServiceMonitor"


# ---------------------------------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[set[str], dict[str, set[str]]]]:
    """A real server (tiny model) after a few requests of every kind: (sample names, labels per sample name)."""
    from deepseek_server.app import create_app
    from deepseek_server.tiny_model import make_tiny_model

    from devcluster.testing.model_server import ServerThread, SigningKey, mint, tiny_settings, write_auth_dir

    root = tmp_path_factory.mktemp("dashboard")
    model = make_tiny_model("llama", root / "tiny")
    key = SigningKey(kid="dashboard-key")
    auth = write_auth_dir(root / "auth", [key], limits={
        "uid-slow": {"rps": 0.1, "burst": 1, "tpm": None, "parallel": None}})
    server = ServerThread(create_app(tiny_settings(model, auth_dir=auth))).start()
    try:
        headers = {"Authorization": f"Bearer {mint(key)}"}
        body = {"model": "deepseek-tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                "temperature": 0}
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(2):  # the second is answered from the response cache
                assert http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
            with http.stream("POST", "/v1/completions", headers=headers,
                             json={"model": "deepseek-tiny", "prompt": "hi", "max_tokens": 4, "temperature": 0.7,
                                   "stream": True}) as streamed:
                assert streamed.status_code == 200
                streamed.read()
            slow = {"Authorization": f"Bearer {mint(key, uid='uid-slow')}"}
            statuses = [http.post("/v1/chat/completions", json=body, headers=slow).status_code for _ in range(3)]
            assert 429 in statuses, statuses
            text = http.get("/metrics").text
    finally:
        server.stop()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    yield set(labels), labels


def test_every_metric_the_dashboard_and_the_alerts_use_is_exported_by_the_server(monitoring_docs, exported) -> None:
    names, labels = exported
    for where, expr in all_expressions(monitoring_docs).items():
        missing = metric_names(expr) - names
        assert not missing, f"{where} uses {sorted(missing)}, which the server does not export"
        # Grouping labels must exist on the series (or be added by Prometheus at scrape time).
        for grouped in re.findall(r"by \(([^)]*)\)", expr):
            for label in (part.strip() for part in grouped.split(",")):
                if label in TARGET_LABELS or label.startswith("deepseek_ai_"):
                    continue
                assert any(label in labels[name] for name in metric_names(expr)), \
                    f"{where} groups by {label!r}, a label none of {sorted(metric_names(expr))} has"
