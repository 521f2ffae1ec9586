"""End to end through Helm, on the same path as `make demo`: chart installed into devcluster, the operator pod (from
the chart's settings) reconciles a DeepSeekDeployment and an ApiKey applied with kubectl, an OpenAI client gets a
completion through the active Service, RBAC is least-privilege, and `helm uninstall` removes what the chart made."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from devcluster import demo
from devcluster.cli_pods import pod_dir
from devcluster.cluster import named_state_dir
from devcluster.testing.polling import wait_for
from devcluster.testing.ports import free_port, lost_bind_race

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def proxy_lost_its_port(name: str) -> bool:
    """Whether the demo's `devcluster proxy` could not bind its port (another process took it first)."""
    log = named_state_dir(name) / "logs" / "demo-proxy.log"
    return log.exists() and lost_bind_race(log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def running_demo():
    name = f"e2e-demo-{os.getpid()}"
    lines: list[str] = []
    try:
        for attempt in range(3):
            try:
                # the proxy binds the port itself: a port free now may be taken before; `up` again on another
                started = demo.up(name=name, port=free_port(), log=lines.append)
                break
            except RuntimeError:
                if attempt == 2 or not proxy_lost_its_port(name):
                    raise
                (named_state_dir(name) / "logs" / "demo-proxy.log").unlink()
    except BaseException:  # pytest's timeout and failures too: never leave a cluster behind
        print("\n".join(lines))
        demo.down(name)
        raise
    yield started
    demo.down(name)


def test_demo_prints_a_working_openai_example(running_demo):
    from openai import OpenAI

    text = demo.instructions(running_demo)
    assert running_demo.base_url in text and "OPENAI_API_KEY" in text and running_demo.api_key not in text
    client = OpenAI(base_url=running_demo.base_url, api_key=running_demo.api_key, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=running_demo.model, max_tokens=8,
                                           messages=[{"role": "user", "content": "Hello!"}])
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0

    # What the user is told to paste, run as printed from the repository root: the exports (the key through
    # `kubectl deepseek env`), the curl, and the OpenAI-client snippet.
    lines = text.splitlines()
    shell = lines[next(i for i, line in enumerate(lines) if "export PATH=" in line):
                  next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/python - <<"))]
    snippet = lines[next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/python - <<")):
                    next(i for i, line in enumerate(lines) if line == "PY") + 1]
    exports = [line for line in shell if "curl" not in line and not line.strip().startswith(("-H", "-d"))]
    curl = subprocess.run(["bash", "-ec", "\n".join(shell)], cwd=demo.REPO, capture_output=True, text=True,
                          timeout=120)
    assert curl.returncode == 0, f"exit {curl.returncode}: {curl.stdout}{curl.stderr}"
    answer = json.loads(curl.stdout.splitlines()[-1])  # after the `kubectl get dsd,ak` table
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] > 0
    client = subprocess.run(["bash", "-ec", "\n".join(exports + snippet)], cwd=demo.REPO, capture_output=True,
                            text=True, timeout=120)
    assert client.returncode == 0 and client.stdout.strip(), client.stderr
    assert running_demo.api_key not in curl.stdout + curl.stderr + client.stdout + client.stderr


def test_chart_installed_crds_and_operator_from_chart_settings(running_demo):
    cluster = running_demo.cluster
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/deepseekdeployments.deepseek.ai" in crds
    assert "customresourcedefinition.apiextensions.k8s.io/apikeys.deepseek.ai" in crds
    dep = json.loads(cluster.kubectl("get", "deploy", "deepseek-operator", "-n", demo.OPERATOR_NAMESPACE,
                                     "-o", "json").stdout)
    # Two replicas (the chart's default): one holds the leader-election Lease, the other stands by.
    assert dep["status"]["readyReplicas"] == 2
    pods = json.loads(cluster.kubectl("get", "pods", "-n", demo.OPERATOR_NAMESPACE, "-o", "json").stdout)["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running", "Running"]
    lease = json.loads(cluster.kubectl("get", "lease", "deepseek-operator", "-n", demo.OPERATOR_NAMESPACE,
                                       "-o", "json").stdout)
    leader = lease["spec"]["holderIdentity"].rpartition("_")[0]
    assert leader in [p["metadata"]["name"] for p in pods]
    # This Kubernetes serves MutatingAdmissionPolicy: the chart installed the one that puts the ApiKey finalizer on
    # new keys (what it does: tests/integration/test_apikey_burst.py).
    policies = cluster.kubectl("get", "mutatingadmissionpolicies,mutatingadmissionpolicybindings", "-o",
                               "name").stdout.split()
    assert sorted(policies) == [
        "mutatingadmissionpolicy.admissionregistration.k8s.io/deepseek-operator-apikey-finalizer",
        "mutatingadmissionpolicybinding.admissionregistration.k8s.io/deepseek-operator-apikey-finalizer"]

    def completed() -> dict | None:
        dsd = json.loads(cluster.kubectl("get", "dsd", "tiny", "-n", running_demo.namespace, "-o", "json").stdout)
        status = dsd.get("status") or {}
        return status if (status.get("rollout") or {}).get("phase") == "Completed" else None

    # Ready comes while the first rollout still verifies after its switch; then it completes
    status = wait_for("the first rollout to complete", completed, timeout=600, interval=1)
    # the first revision is served by blue, and the active Service selects exactly its ready pods
    assert status["activeColor"] == "blue"
    assert status["activeRevision"] == status["rollout"]["revision"] and status["readyReplicas"] >= 1
    service = json.loads(cluster.kubectl("get", "svc", "tiny", "-n", running_demo.namespace, "-o", "json").stdout)
    selector = service["spec"]["selector"]
    assert selector["deepseek.ai/color"] == "blue" and selector["deepseek.ai/revision"] == status["activeRevision"]
    selected = json.loads(cluster.kubectl("get", "pods", "-n", running_demo.namespace, "-o", "json", "-l",
                                          ",".join(f"{k}={v}" for k, v in selector.items())).stdout)["items"]
    assert len(selected) == status["readyReplicas"]
    # The chart's RBAC holds only the verbs the operator calls: it got this far without one refused call.
    for pod in pods:
        folder, containers = pod_dir(cluster, demo.OPERATOR_NAMESPACE, pod["metadata"]["name"])
        assert folder is not None
        log = "".join(run.read_text(errors="replace")
                      for run in sorted((folder / "logs" / containers[0]).glob("*.log")))
        assert log and " 403 " not in log and "forbidden" not in log.lower(), log[-3000:]
        assert ("now holds lease" in log) == (pod["metadata"]["name"] == leader), log[-3000:]


SA = f"system:serviceaccount:{demo.OPERATOR_NAMESPACE}:deepseek-operator"


# The operator's ClusterRole (watchNamespaces: []) holds the verbs its code calls and nothing else; each "no" below is
# a verb it does not use (tests/chart/test_chart.py holds the full list, for both modes).
@pytest.mark.parametrize(("verb", "resource", "namespace", "allowed"), [
    # ApiKey Secrets: read, written and deleted by name; listed and watched (metadata only, by label) for the ApiKey
    # Secret watch, which with watchNamespaces: [] covers every namespace; never patched.
    ("create", "secrets", "demo", True),
    ("get", "secrets", "demo", True),
    ("update", "secrets", "demo", True),
    ("delete", "secrets", "demo", True),
    ("list", "secrets", "demo", True),
    ("watch", "secrets", "kube-system", True),
    ("list", "secrets", "", True),
    ("patch", "secrets", "demo", False),
    # Private signing keys: in the operator's own namespace, listed (by label) there for the orphan sweep.
    ("list", "secrets", demo.OPERATOR_NAMESPACE, True),
    ("create", "secrets", demo.OPERATOR_NAMESPACE, True),
    ("delete", "secrets", demo.OPERATOR_NAMESPACE, True),
    ("patch", "secrets", demo.OPERATOR_NAMESPACE, False),
    # Its own kinds.
    ("watch", "deepseekdeployments.deepseek.ai", "", True),
    ("patch", "deepseekdeployments.deepseek.ai/status", "demo", True),
    ("update", "apikeys.deepseek.ai/status", "demo", True),
    ("update", "deepseekdeployments.deepseek.ai", "demo", False),
    ("delete", "apikeys.deepseek.ai", "demo", False),
    # Children: created, then replaced (Deployments, ConfigMaps) or server-side applied (the rest); owner
    # references delete them, so the operator never does.
    ("create", "deployments.apps", "demo", True),
    ("update", "deployments.apps", "demo", True),
    ("list", "deployments.apps", "demo", True),
    ("patch", "deployments.apps", "demo", False),
    ("delete", "deployments.apps", "demo", False),
    ("watch", "deployments.apps", "demo", False),
    ("create", "services", "demo", True),
    ("patch", "services", "demo", True),
    ("update", "services", "demo", False),
    ("delete", "services", "demo", False),
    ("list", "services", "demo", False),
    ("watch", "services", "demo", False),
    ("create", "configmaps", "demo", True),
    ("update", "configmaps", "demo", True),
    ("watch", "configmaps", "demo", True),  # held only so the server's Role may grant it
    ("list", "configmaps", "demo", False),
    ("patch", "configmaps", "demo", False),
    ("delete", "configmaps", "demo", False),
    ("create", "rolebindings.rbac.authorization.k8s.io", "demo", True),
    ("patch", "roles.rbac.authorization.k8s.io", "demo", True),
    ("list", "roles.rbac.authorization.k8s.io", "demo", False),
    ("watch", "rolebindings.rbac.authorization.k8s.io", "demo", False),
    ("delete", "rolebindings.rbac.authorization.k8s.io", "demo", False),
    ("update", "serviceaccounts", "demo", False),
    ("list", "pods", "demo", True),
    ("get", "pods", "demo", False),
    ("watch", "pods", "demo", False),
    ("create", "pods", "demo", False),
    ("list", "endpointslices.discovery.k8s.io", "demo", True),
    ("watch", "endpointslices.discovery.k8s.io", "demo", False),
    ("create", "events", "demo", True),
    ("patch", "events", "demo", False),
    ("create", "events.events.k8s.io", "demo", False),
    # Leader election: its Lease in the operator's own namespace, nowhere else.
    ("get", "leases.coordination.k8s.io", demo.OPERATOR_NAMESPACE, True),
    ("create", "leases.coordination.k8s.io", demo.OPERATOR_NAMESPACE, True),
    ("update", "leases.coordination.k8s.io", demo.OPERATOR_NAMESPACE, True),
    ("delete", "leases.coordination.k8s.io", demo.OPERATOR_NAMESPACE, False),
    ("list", "leases.coordination.k8s.io", demo.OPERATOR_NAMESPACE, False),
    ("get", "leases.coordination.k8s.io", "demo", False),
    # Nothing cluster-scoped, no way around RBAC.
    ("delete", "nodes", "", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "", False),
    ("create", "pods/exec", "demo", False),
    ("escalate", "roles.rbac.authorization.k8s.io", "demo", False),
    ("bind", "roles.rbac.authorization.k8s.io", "demo", False),
    ("impersonate", "serviceaccounts", "demo", False),
])
def test_operator_rbac_is_least_privilege(running_demo, verb, resource, namespace, allowed):
    # `can-i VERB TYPE/NAME` would read a subresource as an object name: name it with --subresource.
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, "--as", SA]
    args += [f"--subresource={subresource}"] if subresource else []
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    out = running_demo.cluster.kubectl(*args, check=False)
    assert out.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, namespace, out.stdout, out.stderr)


def test_helm_uninstall_removes_what_the_chart_installed(running_demo):
    cluster = running_demo.cluster
    cluster.helm("uninstall", "deepseek-operator", "--namespace", demo.OPERATOR_NAMESPACE, "--wait")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = cluster.kubectl("get", "deploy,sa,pods", "-n", demo.OPERATOR_NAMESPACE, "-o", "name").stdout.split()
        if not left or left == ["serviceaccount/default"]:
            break
        time.sleep(1)
    assert left in ([], ["serviceaccount/default"]), left
    roles = cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout
    assert "deepseek-operator" not in roles
    policies = cluster.kubectl("get", "mutatingadmissionpolicies,mutatingadmissionpolicybindings", "-o", "name").stdout
    assert "deepseek-operator" not in policies
    # CRDs stay (the chart marks them helm.sh/resource-policy: keep): the users' DeepSeekDeployments and keys are not
    # lost by an uninstall.
    assert "deepseekdeployments.deepseek.ai" in cluster.kubectl("get", "crd", "-o", "name").stdout
    assert cluster.kubectl("get", "dsd", "tiny", "-n", running_demo.namespace, "-o", "name").stdout.strip()
