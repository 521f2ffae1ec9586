"""The chart's NetworkPolicy, rendered by `helm template` and created in devcluster's API server, selects exactly
the server pods the operator creates, on the server port, and admits exactly the sources it should: pods of the
servers' own namespace, the operator's pods in the release namespace, and namespaces the values allow.

devcluster has no CNI that enforces NetworkPolicy, so selection and admission are checked by evaluating the
policy's label selectors against the real pods and namespaces, as an enforcing CNI would.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from devcluster import build
from devcluster.testing.bluegreen import REPO, World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

CHART = REPO / "charts" / "deepseek-operator"
SERVER_PORT = 8000
CLIENTS_LABEL = {"deepseek.ai/clients": "true"}


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions); an empty selector selects all."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def admits(policy: dict[str, Any], source_labels: dict[str, str], source_namespace: dict[str, str],
           port: int) -> bool:
    """Whether an ingress rule of `policy` admits a pod (labels) of a namespace (labels) on `port`/TCP."""
    own_namespace = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports") or []
        if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True  # a rule without `from` admits every source
        for peer in peers:
            if "ipBlock" in peer:
                continue
            if "namespaceSelector" in peer:
                namespace_ok = selects(peer["namespaceSelector"], source_namespace)
            else:
                namespace_ok = source_namespace.get("kubernetes.io/metadata.name") == own_namespace
            pod_ok = selects(peer.get("podSelector"), source_labels) if "podSelector" in peer else True
            if namespace_ok and pod_ok:
                return True
    return False


def render(release_namespace: str, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    helm = build.binary("helm")
    assert helm.exists(), "helm is not built: run `python -m devcluster build`"
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    out = subprocess.run([str(helm), "template", "rel", str(CHART), "--namespace", release_namespace,
                          "--kube-version", build.KUBERNETES_VERSION.lstrip("v"), "-f", str(values_file)],
                         capture_output=True, text=True, check=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def simulated_pod(core: client.CoreV1Api, namespace: str, name: str, labels: dict[str, str]) -> None:
    """A pod devcluster only simulates (its image maps to no process): enough to carry labels."""
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "registry.example/client:1"}]}})


def operator_created(pod: client.V1Pod, apps: client.AppsV1Api) -> bool:
    """Pod -> ReplicaSet -> Deployment whose controller is a DeepSeekDeployment."""
    for owner in pod.metadata.owner_references or []:
        if owner.kind != "ReplicaSet":
            continue
        replica_set = apps.read_namespaced_replica_set(owner.name, pod.metadata.namespace)
        for rs_owner in replica_set.metadata.owner_references or []:
            if rs_owner.kind == "Deployment":
                deployment = apps.read_namespaced_deployment(rs_owner.name, pod.metadata.namespace)
                return any(o.kind == "DeepSeekDeployment" and o.controller
                           for o in deployment.metadata.owner_references or [])
    return False


def test_the_chart_policy_selects_the_operators_pods_and_admits_only_its_sources(world: World, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:6]
    release_ns, clients_ns, other_ns = f"ops-{suffix}", f"clients-{suffix}", f"other-{suffix}"
    core, apps = world.core, world.apps
    networking = client.NetworkingV1Api(world.api_client)
    for name, labels in ((release_ns, {}), (clients_ns, CLIENTS_LABEL), (other_ns, {})):
        core.create_namespace({"metadata": {"name": name, "labels": labels}})
    try:
        docs = render(release_ns, {"watchNamespaces": [world.namespace], "networkPolicy": {
            "enabled": True, "allowedNamespaceSelector": {"matchLabels": CLIENTS_LABEL}}}, tmp_path)
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        assert [p["metadata"]["namespace"] for p in policies] == [world.namespace]
        created = networking.create_namespaced_network_policy(world.namespace, policies[0])
        policy = world.api_client.sanitize_for_serialization(
            networking.read_namespaced_network_policy(created.metadata.name, world.namespace))
        operator_deployment = next(d for d in docs if d["kind"] == "Deployment")
        operator_labels = operator_deployment["spec"]["template"]["metadata"]["labels"]

        # blue and green server pods of the operator (a rollout keeps the old color warm)
        world.create()
        first = world.wait_phase("Completed", timeout=300)["activeRevision"]
        world.patch({"spec": {"model": {"revision": "v2"}}})
        second = wait_for("the v2 rollout", lambda: (r := world.status().get("rollout") or {}).get("revision")
                          not in (None, first) and r["revision"], 60)
        world.wait_phase("Completed", revision=second, timeout=300)

        # pods the operator did not create, in every namespace that matters
        simulated_pod(core, world.namespace, "client", {"app": "client"})
        simulated_pod(core, world.namespace, "look-alike", {"app.kubernetes.io/name": "deepseek-server"})
        simulated_pod(core, release_ns, "operator", operator_labels)
        simulated_pod(core, release_ns, "other-in-release", {"app": "something-else"})
        simulated_pod(core, clients_ns, "client", {"app": "client"})
        simulated_pod(core, other_ns, "intruder", {"app": "client", **operator_labels})

        pods = core.list_namespaced_pod(world.namespace).items
        servers = {p.metadata.name for p in pods if operator_created(p, apps)}
        colors = {p.metadata.labels.get("deepseek.ai/color") for p in pods if p.metadata.name in servers}
        assert colors == {"blue", "green"}, colors
        selected = {p.metadata.name for p in pods if selects(policy["spec"]["podSelector"], p.metadata.labels or {})}
        assert selected == servers, f"selected {sorted(selected)}; the operator's pods are {sorted(servers)}"
        assert policy["spec"]["policyTypes"] == ["Ingress"]

        # the port it opens is the servers' port, and the only one
        server_pod = next(p for p in pods if p.metadata.name in servers)
        container_ports = {port.container_port for c in server_pod.spec.containers for port in c.ports or []}
        assert container_ports == {SERVER_PORT}
        rule_ports = [p for rule in policy["spec"]["ingress"] for p in rule.get("ports") or []]
        assert rule_ports and all(p["port"] == SERVER_PORT and p["protocol"] == "TCP" for p in rule_ports)

        namespace_labels = {n: core.read_namespace(n).metadata.labels or {}
                            for n in (world.namespace, release_ns, clients_ns, other_ns)}
        expected = {
            (world.namespace, "client"): True,  # the servers' own namespace
            (world.namespace, "look-alike"): True,
            (release_ns, "operator"): True,  # rollout verification
            (release_ns, "other-in-release"): False,
            (clients_ns, "client"): True,  # allowed by the values' namespace selector
            (other_ns, "intruder"): False,  # operator labels in another namespace do not count
        }
        for (namespace, name), admitted in expected.items():
            labels = core.read_namespaced_pod(name, namespace).metadata.labels or {}
            assert admits(policy, labels, namespace_labels[namespace], SERVER_PORT) is admitted, (namespace, name)
            assert not admits(policy, labels, namespace_labels[namespace], SERVER_PORT + 1), (namespace, name)
    finally:
        for name in (release_ns, clients_ns, other_ns):
            core.delete_namespace(name, propagation_policy="Background")
