"""The devcluster control plane is a real Kubernetes: these tests talk to its API server, scheduler and controllers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kubernetes import client

from devcluster.build import KUBERNETES_VERSION
from devcluster.cluster import KubectlError
from devcluster.testing.polling import wait_for

pytestmark = pytest.mark.cluster




def test_version_reports_built_release(cluster):
    status, body = cluster.get("/version")
    assert status == 200
    assert json.loads(body)["gitVersion"] == KUBERNETES_VERSION


def test_kubectl_and_helm_work_with_written_kubeconfig(cluster):
    namespaces = cluster.kubectl("get", "ns", "-o", "name").stdout.split()
    assert "namespace/default" in namespaces and "namespace/kube-system" in namespaces
    assert cluster.kubectl("version", "-o", "json").returncode == 0
    listed = cluster.helm("list", "-A", "-o", "json")
    assert json.loads(listed.stdout) == []


def test_gpu_nodes_are_ready_with_capacity(cluster, api_client):
    nodes = client.CoreV1Api(api_client).list_node(label_selector="devcluster.deepseek.ai/node=true").items
    assert len(nodes) == cluster.config.nodes
    for node in nodes:
        assert node.status.allocatable["nvidia.com/gpu"] == str(cluster.config.gpus_per_node)
        assert node.metadata.labels["nvidia.com/gpu.product"] == cluster.config.gpu_product
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True"


def gpu_deployment(name: str, replicas: int, gpus: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "main", "image": "example.com/gpu-workload:1",
                                     "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}},
    }


def test_gpu_deployment_schedules_and_runs(cluster, api_client, namespace):
    apps = client.AppsV1Api(api_client)
    core = client.CoreV1Api(api_client)
    apps.create_namespaced_deployment(namespace, gpu_deployment("gpu", replicas=2, gpus=1))

    def ready_pods():
        pods = core.list_namespaced_pod(namespace, label_selector="app=gpu").items
        ready = [p for p in pods if p.status.phase == "Running"
                 and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return ready if len(ready) == 2 else None

    pods = wait_for("2 Running and Ready pods", ready_pods)
    for pod in pods:
        assert pod.spec.node_name.startswith("gpu-node-")
        assert pod.status.pod_ip and not pod.status.pod_ip.startswith("127.")
        owner = pod.metadata.owner_references[0]
        assert owner.kind == "ReplicaSet"
    assert len({p.status.pod_ip for p in pods}) == 2
    dep = wait_for("deployment available",
                   lambda: (d := apps.read_namespaced_deployment(name="gpu", namespace=namespace))
                   and (d.status.available_replicas or 0) == 2 and d)
    assert dep.status.ready_replicas == 2


def test_pod_asking_for_too_many_gpus_stays_pending(cluster, api_client, namespace):
    core = client.CoreV1Api(api_client)
    too_many = cluster.config.gpus_per_node + 1
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "greedy"},
        "spec": {"containers": [{"name": "main", "image": "example.com/gpu-workload:1",
                                 "resources": {"limits": {"nvidia.com/gpu": str(too_many)}}}]}})

    def failed_scheduling():
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=greedy").items
        return [e for e in events if e.reason == "FailedScheduling"]

    events = wait_for("a FailedScheduling event", failed_scheduling, timeout=30)
    assert "nvidia.com/gpu" in events[0].message
    pod = core.read_namespaced_pod("greedy", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None


def test_deleting_owner_garbage_collects_children(cluster, api_client, namespace):
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {"a": "1"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]}})
    apps = client.AppsV1Api(api_client)
    apps.create_namespaced_deployment(namespace, gpu_deployment("gc", replicas=1, gpus=1))
    wait_for("the pod of deployment gc",
             lambda: core.list_namespaced_pod(namespace, label_selector="app=gc").items)

    core.delete_namespaced_config_map("owner", namespace)
    apps.delete_namespaced_deployment("gc", namespace, propagation_policy="Background")

    def gone():
        cms = {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
        pods = core.list_namespaced_pod(namespace, label_selector="app=gc").items
        rss = apps.list_namespaced_replica_set(namespace, label_selector="app=gc").items
        return "child" not in cms and not pods and not rss

    wait_for("children garbage-collected (ConfigMap, ReplicaSet, pods)", gone, timeout=60)


CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.test.devcluster.io}
spec:
  group: test.devcluster.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
"""


def test_crd_is_served_and_schema_enforced(cluster, namespace):
    cluster.kubectl("apply", "-f", "-", input=CRD)
    cluster.wait_established("widgets.test.devcluster.io", timeout=30)
    good = "apiVersion: test.devcluster.io/v1\nkind: Widget\nmetadata: {name: ok}\nspec: {size: 3}\n"
    bad = "apiVersion: test.devcluster.io/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {size: 99}\n"
    # applied the moment the CRD is Established: apply waits while the kind is not served yet
    cluster.apply(good, namespace=namespace, timeout=30)
    started = time.monotonic()
    with pytest.raises(KubectlError) as rejected:  # a schema rejection is final: no waiting, and it says why
        cluster.apply(bad, namespace=namespace, timeout=30)
    assert time.monotonic() - started < 10
    assert "spec.size" in str(rejected.value) and "less than or equal to 10" in str(rejected.value)
    names = cluster.kubectl("get", "widgets", "-n", namespace, "-o", "name").stdout.split()
    assert names == ["widget.test.devcluster.io/ok"]


def test_cli_up_down_leaves_nothing_behind(tmp_path):
    """`python -m devcluster up` starts a cluster in the background; `down` stops every process and removes state."""
    import os
    import subprocess
    import sys

    from devcluster.cluster import _alive

    env = dict(os.environ, DEVCLUSTER_CACHE=str(tmp_path / "cache"))
    # Reuse the built binaries: point the cache at the real one but keep cluster state under tmp_path.
    real_cache = __import__("devcluster.paths", fromlist=["cache_root"]).cache_root()
    (tmp_path / "cache").mkdir()
    for entry in real_cache.iterdir():
        if entry.name != "clusters":
            (tmp_path / "cache" / entry.name).symlink_to(entry)
    started = time.monotonic()
    up = subprocess.run([sys.executable, "-m", "devcluster", "--name", "clitest", "up", "--nodes", "1"],
                        capture_output=True, text=True, env=env, timeout=180)
    assert up.returncode == 0, up.stderr
    elapsed = time.monotonic() - started
    print(f"devcluster up (warm cache) took {elapsed:.1f}s")
    assert up.stdout.startswith("export KUBECONFIG=")
    state_dir = tmp_path / "cache" / "clusters" / "clitest"
    state = json.loads((state_dir / "state.json").read_text())
    pids = list(state["pids"].values())
    assert len(pids) == 5 and all(_alive(p) for p in pids)
    status = subprocess.run([sys.executable, "-m", "devcluster", "--name", "clitest", "status"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert status.returncode == 0 and '"kube-apiserver": "running"' in status.stdout
    down = subprocess.run([sys.executable, "-m", "devcluster", "--name", "clitest", "down"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids)
    assert not state_dir.exists()
    links = subprocess.run(["ip", "-o", "link", "show", state["bridge"]], capture_output=True, text=True)
    assert links.returncode != 0, f"bridge {state['bridge']} left behind"
