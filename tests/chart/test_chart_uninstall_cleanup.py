"""The pre-delete hook that empties the CRDs before `helm uninstall` deletes them (crds.keep=false): rendered only
then, and only where Helm talks to a cluster (never by a plain `helm template`), with RBAC that lists and deletes the
two kinds and nothing else, created in order before its Job.

`helm template` here has no cluster, so the tests of the hook's objects render them with crds.cleanupHookOffline, which
renders the same template body; tests/e2e/test_uninstall_cleanup.py installs with real helm and shows that an install
against a cluster renders (and an uninstall runs) the hook without it."""

from __future__ import annotations

import pytest
import yaml
from test_chart import CHART, KUBE_VERSION, granted, helm, render

HOOK = "rel-deepseek-operator-uninstall-cleanup"
# list (metadata only: names, finalizers) and delete per namespace in one request; not get, watch, update or patch, no
# status or finalizers subresource, no Secret: revoking and finalizing are the operator's.
HOOK_VERBS = {("deepseek.ai", "apikeys"): {"list", "deletecollection"},
              ("deepseek.ai", "deepseekdeployments"): {"list", "deletecollection"}}


HOOK_KINDS = ["ClusterRole", "ClusterRoleBinding", "Job", "Role", "RoleBinding", "ServiceAccount"]
# the operator's Deployment, read (get) and nothing else: nothing is deleted until it has a ready replica
OPERATOR_READ = [{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["rel-deepseek-operator"],
                  "verbs": ["get"]}]

# crds.keep=false, with the hook rendered by `helm template` as `helm install` renders it against a cluster
KEEP_FALSE = ("crds.keep=false", "crds.cleanupHookOffline=true")


def hook_objects(*sets: str) -> list[dict]:
    return [d for d in render(*sets) if "helm.sh/hook" in (d["metadata"].get("annotations") or {})]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_hook_renders_only_when_the_chart_deletes_the_crds():
    assert sorted(d["kind"] for d in hook_objects(*KEEP_FALSE)) == HOOK_KINDS
    # The CRDs are kept (the default), or not the chart's: `helm uninstall` deletes no ApiKey, nothing to empty.
    for sets in ((), ("crds.keep=true",), ("crds.enabled=false",), ("crds.enabled=false", "crds.keep=false"),
                 ("crds.cleanupHookOffline=true",), ("crds.enabled=false", *KEEP_FALSE)):
        assert hook_objects(*sets) == [], sets


def test_helm_template_renders_no_cleanup_job_that_applying_its_output_would_run():
    """`helm template` (no cluster: its lookups find nothing) leaves the hook out with crds.keep=false, so a tool that
    applies the output as plain objects (kubectl apply, kustomize's helmCharts) creates no Job that deletes every
    ApiKey at once. With crds.cleanupHookOffline it is rendered, for tools that run pre-delete hooks as hooks."""
    def names(docs: list[dict]) -> set[tuple[str, str]]:
        return {(d["kind"], d["metadata"]["name"]) for d in docs}

    plain = render("crds.keep=false")
    assert not [d for d in plain if d["kind"] == "Job" or "helm.sh/hook" in (d["metadata"].get("annotations") or {})]
    assert hook_objects("crds.keep=false", "watchNamespaces={team-a}") == []
    offline = render(*KEEP_FALSE)
    assert ("Job", HOOK) in names(offline)
    # Only the hook's objects differ; the CRDs still go with the release (no resource-policy: keep).
    assert names(offline) - names(plain) == names(hook_objects(*KEEP_FALSE))
    crd = next(d for d in plain if d["kind"] == "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "crds.keep=false",
               "--set", "crds.cleanupHookOffline=yes", check=False)
    assert out.returncode != 0 and "cleanupHookOffline" in out.stderr


def test_hook_job_runs_the_operator_image_before_delete_and_keeps_a_failed_run_for_its_log():
    docs = render(*KEEP_FALSE)
    [job] = by_kind(hook_objects(*KEEP_FALSE), "Job")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    operator = deployment["spec"]["template"]["spec"]
    # Not one of the operator's pods for its Deployment, PodDisruptionBudget or NetworkPolicy.
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/component"] == "uninstall-cleanup"
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-delete"
    # Replaced by the next try; deleted once it succeeded; a failed one stays, so `kubectl logs` shows what is left.
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    # `helm uninstall` prints a failed run's log: what is left, and why.
    assert annotations["helm.sh/hook-output-log-policy"] == "hook-failed"
    assert job["metadata"]["name"] == HOOK and job["metadata"]["namespace"] == "ops"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == HOOK
    assert pod["securityContext"] == operator["securityContext"]
    [container] = pod["containers"]
    assert container["image"] == operator["containers"][0]["image"]
    assert "command" not in container  # the image's entry point: deepseek-operator
    assert container["args"] == ["uninstall-cleanup", "--all-namespaces", "--timeout", "3m",
                                 "--operator", "ops/rel-deepseek-operator"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # A backstop past the command's own timeout (which names what is left): image pull and start-up on top.
    assert job["spec"]["activeDeadlineSeconds"] == 180 + 120


def test_hook_timeout_is_a_value():
    [job] = by_kind(hook_objects(*KEEP_FALSE, "crds.cleanupTimeout=10m30s"), "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--timeout") + 1] == "10m30s"
    assert job["spec"]["activeDeadlineSeconds"] == 630 + 120
    out = helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "crds.keep=false",
               "--set", "crds.cleanupTimeout=soon", check=False)
    assert out.returncode != 0 and "does not match pattern" in out.stderr


def test_hook_rbac_lists_and_deletes_the_two_kinds_everywhere_and_nothing_else():
    docs = hook_objects(*KEEP_FALSE)
    [role] = by_kind(docs, "ClusterRole")
    assert role["metadata"]["name"] == HOOK
    assert granted(role["rules"]) == HOOK_VERBS
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": HOOK}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": HOOK, "namespace": "ops"}]
    [account] = by_kind(docs, "ServiceAccount")
    assert (account["metadata"]["name"], account["metadata"]["namespace"]) == (HOOK, "ops")
    [read] = by_kind(docs, "Role")
    assert (read["metadata"]["name"], read["metadata"]["namespace"]) == (HOOK, "ops")
    assert read["rules"] == OPERATOR_READ
    [read_binding] = by_kind(docs, "RoleBinding")
    assert read_binding["metadata"]["namespace"] == "ops"
    assert read_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": HOOK}
    assert read_binding["subjects"] == [{"kind": "ServiceAccount", "name": HOOK, "namespace": "ops"}]
    assert sorted(d["kind"] for d in docs) == HOOK_KINDS


def test_hook_in_namespaced_mode_acts_in_the_watched_namespaces_with_rights_that_need_none_of_them():
    """Its rights are cluster-scoped objects, so that Helm can create them at uninstall even when a watched namespace
    was deleted meanwhile (a Role there would fail the whole uninstall); the command names the watched namespaces."""
    docs = hook_objects(*KEEP_FALSE, "watchNamespaces={team-a,team-b}")
    assert sorted(d["kind"] for d in docs) == HOOK_KINDS
    assert not [d for d in docs if d["metadata"].get("namespace") not in (None, "ops")]
    [role] = by_kind(docs, "ClusterRole")
    assert granted(role["rules"]) == HOOK_VERBS
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": HOOK, "namespace": "ops"}]
    [job] = by_kind(docs, "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:5] == ["uninstall-cleanup", "--namespace", "team-a", "--namespace", "team-b"]
    assert "--all-namespaces" not in args


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={team-a,team-b}",)])
def test_hook_account_and_rbac_exist_before_the_job_and_go_with_it(sets):
    docs = hook_objects(*KEEP_FALSE, *sets)
    weight = {(d["kind"], d["metadata"].get("namespace")): int(d["metadata"]["annotations"]["helm.sh/hook-weight"])
              for d in docs}
    account = weight[("ServiceAccount", "ops")]
    roles = [w for (kind, _), w in weight.items() if kind in ("ClusterRole", "Role")]
    bindings = [w for (kind, _), w in weight.items() if kind in ("ClusterRoleBinding", "RoleBinding")]
    # Helm creates hooks in weight order and waits only for Jobs: the account, its role and its binding come first.
    assert account < min(roles) and max(roles) < min(bindings) and max(bindings) < weight[("Job", "ops")]
    for doc in docs:
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete", doc["kind"]
        assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation",
                                                                               "hook-succeeded"}, doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "uninstall-cleanup"


def test_lint_is_clean_with_the_hook():
    assert by_kind(hook_objects(*KEEP_FALSE, "watchNamespaces={team-a}"), "Job")
    out = helm("lint", str(CHART), "--strict", "--set", "crds.keep=false", "--set", "crds.cleanupHookOffline=true",
               "--set", "watchNamespaces={team-a}")
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_template_with_no_hooks_leaves_the_hook_out_and_the_rest_in():
    """With the hook rendered offline, `--no-hooks` drops the hook's objects (whose Job, applied as a plain object,
    would delete every ApiKey at once), and nothing else."""
    def kinds(*flags: str) -> list[tuple[str, str]]:
        out = helm("template", "rel", str(CHART), "--namespace", "ops", "--kube-version", KUBE_VERSION,
                   "--set", "crds.keep=false", "--set", "crds.cleanupHookOffline=true", *flags)
        return sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d)

    with_hooks, without = kinds(), kinds("--no-hooks")
    hook = sorted((d["kind"], d["metadata"]["name"]) for d in hook_objects(*KEEP_FALSE))
    assert ("Job", HOOK) in hook
    assert without == sorted(set(with_hooks) - set(hook))
    assert ("CustomResourceDefinition", "apikeys.deepseek.ai") in without
