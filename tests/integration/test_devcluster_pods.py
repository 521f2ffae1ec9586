"""devcluster runs mapped images as real local processes: honest probes, EndpointSlices, volumes and a proxy.

Everything here goes through the real API server, controller-manager and scheduler of the session's devcluster;
pods run `devcluster/testserver.py` (image `*devcluster-testserver*`) in their own network namespaces.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devcluster import cli_pods, podnet
from devcluster.proxy import ServiceProxy

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

IMAGE = "registry.example/devcluster-testserver:1"
# Mount points missing on the host are created there (empty) and left: keep them under /run, a tmpfs.
MOUNTS = "/run/devcluster-tests"
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- helpers
def wait_for(what: str, check: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, client.ApiException, http.client.HTTPException) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def container(name: str = "app", *, args: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "image": IMAGE, "args": args or ["--port", "8080"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        **extra,
    }


def ready_probe(period: int = 1, failures: int = 1) -> dict[str, Any]:
    return {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def deployment(name: str, labels: dict[str, str], spec_container: dict[str, Any], **pod_spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"terminationGracePeriodSeconds": 5, "containers": [spec_container],
                                       **pod_spec}}},
    }


def bare_pod(name: str, spec_container: dict[str, Any], **pod_spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [spec_container], **pod_spec}}


def is_ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


class Cluster:
    """Small conveniences over the real API for one test namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.ns = namespace
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        wait_for("the default ServiceAccount", lambda: self.core.read_namespaced_service_account("default", namespace))

    def pods(self, selector: str) -> list[client.V1Pod]:
        return [p for p in self.core.list_namespaced_pod(self.ns, label_selector=selector).items
                if not p.metadata.deletion_timestamp]

    def ready_pod(self, selector: str, timeout: float = 30) -> client.V1Pod:
        def check() -> client.V1Pod | None:
            return next((p for p in self.pods(selector) if is_ready(p)), None)

        return wait_for(f"a Ready pod with {selector}", check, timeout, interval=0.05)

    def pod(self, name: str) -> client.V1Pod:
        return self.core.read_namespaced_pod(name, self.ns)

    def ready_ips(self, service: str) -> set[str]:
        slices = self.discovery.list_namespaced_endpoint_slice(
            self.ns, label_selector=f"kubernetes.io/service-name={service}").items
        return {addr for s in slices for ep in s.endpoints or [] if ep.conditions and ep.conditions.ready
                for addr in ep.addresses}

    def service(self, name: str, selector: dict[str, str]) -> None:
        self.core.create_namespaced_service(self.ns, {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": selector, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}})


@pytest.fixture
def kube(cluster, api_client: client.ApiClient, namespace: str) -> Cluster:
    if not cluster.state.network:
        pytest.fail("devcluster has no pod network (it needs root to make a bridge and network namespaces), so "
                    "process pods cannot run: run the tests as root")
    return Cluster(api_client, namespace)


def get(ip: str, path: str = "/", port: int = 8080, timeout: float = 3) -> Any:
    with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=timeout) as resp:
        body = resp.read()
    try:
        return json.loads(body)
    except ValueError:
        return body.decode()


def post(ip: str, path: str, port: int = 8080) -> Any:
    req = urllib.request.Request(f"http://{ip}:{port}{path}", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=3) as resp:
        return json.loads(resp.read())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------- tests
def test_deployment_becomes_ready_through_http_probe_and_answers_on_its_pod_ip(kube: Cluster, cluster) -> None:
    kube.core.create_namespaced_secret(kube.ns, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}})
    app = container(readinessProbe=ready_probe())
    app["env"].append({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}})
    app["env"].append({"name": "GREETING", "value": "hello $(POD_NAME) $$(POD_NAME)"})
    started = time.monotonic()
    kube.apps.create_namespaced_deployment(kube.ns, deployment("web", {"app": "web"}, app))
    pod = kube.ready_pod("app=web")
    elapsed = time.monotonic() - started
    print(f"\nDeployment creation -> pod Ready (real httpGet readiness probe): {elapsed:.2f}s")

    ip = pod.status.pod_ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(cluster.state.pod_cidr)
    assert not ipaddress.ip_address(ip).is_loopback
    info = get(ip)
    assert info["name"] == pod.metadata.name and info["podIP"] == ip and info["hostname"] == pod.metadata.name
    env = get(ip, "/env")
    assert env["TOKEN"] == "s3cret"
    assert env["GREETING"] == f"hello {pod.metadata.name} $(POD_NAME)"
    assert env["KUBERNETES_SERVICE_HOST"] == cluster.network.gateway
    assert env["KUBERNETES_SERVICE_PORT"] == str(cluster.state.apiserver_port)
    # The service-account token is mounted at its real path (in the container's own mount namespace).
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert get(ip, f"/file?path={sa_dir}/namespace") == kube.ns
    assert get(ip, f"/file?path={sa_dir}/ca.crt").startswith("-----BEGIN CERTIFICATE-----")
    token = get(ip, f"/file?path={sa_dir}/token")
    review = client.AuthenticationV1Api(kube.core.api_client).create_token_review({"spec": {"token": token}})
    assert review.status.authenticated  # a real token from the TokenRequest API, bound to this pod
    assert review.status.user.username == f"system:serviceaccount:{kube.ns}:default"
    kube.service("web", {"app": "web"})
    wait_for("the pod IP among the Service's ready endpoints", lambda: ip in kube.ready_ips("web"), timeout=10)
    status = pod.status.container_statuses[0]
    assert status.ready and status.started and status.state.running and status.restart_count == 0


def test_readiness_failure_takes_the_pod_out_of_its_endpoints_and_recovery_puts_it_back(kube: Cluster) -> None:
    kube.apps.create_namespaced_deployment(
        kube.ns, deployment("web", {"app": "web"}, container(readinessProbe=ready_probe(failures=2))))
    kube.service("web", {"app": "web"})
    pod = kube.ready_pod("app=web")
    ip = pod.status.pod_ip
    wait_for("the pod among ready endpoints", lambda: ip in kube.ready_ips("web"), timeout=10)

    post(ip, "/control/ready?value=0")
    wait_for("the pod NotReady", lambda: not is_ready(kube.pod(pod.metadata.name)), timeout=30)
    wait_for("the pod gone from the ready endpoints", lambda: ip not in kube.ready_ips("web"), timeout=30)
    assert get(ip)["name"] == pod.metadata.name  # still running: readiness never restarts a container

    post(ip, "/control/ready?value=1")
    wait_for("the pod Ready again", lambda: is_ready(kube.pod(pod.metadata.name)), timeout=30)
    wait_for("the pod back among ready endpoints", lambda: ip in kube.ready_ips("web"), timeout=30)
    assert kube.pod(pod.metadata.name).status.container_statuses[0].restart_count == 0


def test_liveness_failure_restarts_the_process(kube: Cluster) -> None:
    liveness = {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2}
    kube.apps.create_namespaced_deployment(kube.ns, deployment(
        "web", {"app": "web"}, container(readinessProbe=ready_probe(), livenessProbe=liveness)))
    pod = kube.ready_pod("app=web")
    ip = pod.status.pod_ip
    before = get(ip)

    post(ip, "/control/live?value=0")

    def restarted() -> bool:
        status = kube.pod(pod.metadata.name).status.container_statuses[0]
        return status.restart_count >= 1 and bool(status.state.running)

    wait_for("a restart after the liveness failure", restarted, timeout=20)
    status = kube.pod(pod.metadata.name).status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated is not None
    assert "liveness" in (status.last_state.terminated.message or "")
    after = wait_for("the restarted server", lambda: get(ip), timeout=10)
    assert after["boot"] != before["boot"] and after["pid"] != before["pid"]
    assert not alive(before["pid"])
    kube.ready_pod("app=web")


def test_crashing_command_ends_in_crash_loop_back_off_with_its_exit_code_and_logs(kube: Cluster, cluster,
                                                                                  capsys) -> None:
    crasher = container("crasher", args=[], command=["sh", "-c", "echo crashing as $(POD_NAME); exit 3"])
    kube.core.create_namespaced_pod(kube.ns, bare_pod("crasher", crasher))

    def backing_off() -> client.V1ContainerStatus | None:
        status = (kube.pod("crasher").status.container_statuses or [None])[0]
        waiting = status and status.state.waiting
        return status if waiting and waiting.reason == "CrashLoopBackOff" else None

    status = wait_for("CrashLoopBackOff", backing_off, timeout=20)
    assert status.restart_count >= 1
    assert status.last_state.terminated.exit_code == 3
    assert status.last_state.terminated.reason == "Error"
    assert status.last_state.terminated.message is None  # the default policy reads a file this process never wrote
    assert "back-off 10s" in status.state.waiting.message
    assert kube.pod("crasher").status.phase == "Running"  # restartPolicy Always: the pod keeps trying

    args = argparse.Namespace(pod="crasher", namespace=kube.ns, container=None, follow=False, previous=False)
    assert cli_pods.cmd_logs(args, cluster) == 0
    assert capsys.readouterr().out == "crashing as crasher\n"


def test_a_failed_container_under_fallback_to_logs_on_error_shows_the_end_of_its_log(kube: Cluster) -> None:
    # as the kubelet does: the last 80 lines (at most 2 KiB) of the log become the termination message
    script = "for i in $(seq 1 100); do echo line $i; done; echo the reason is last; exit 4"
    crasher = container("crasher", args=[], command=["sh", "-c", script],
                        terminationMessagePolicy="FallbackToLogsOnError")
    succeeder = container("succeeder", args=[], command=["sh", "-c", "echo fine; exit 0"],
                          terminationMessagePolicy="FallbackToLogsOnError")
    kube.core.create_namespaced_pod(kube.ns, bare_pod("crasher-logs", crasher))
    kube.core.create_namespaced_pod(kube.ns, bare_pod("succeeder-logs", succeeder, restartPolicy="Never"))

    def terminated(pod: str) -> client.V1ContainerStateTerminated | None:
        status = (kube.pod(pod).status.container_statuses or [None])[0]
        return status and (status.last_state.terminated or status.state.terminated)

    failed = wait_for("the crasher to have terminated", lambda: terminated("crasher-logs"), timeout=20)
    assert failed.exit_code == 4
    lines = failed.message.split("\n")
    assert len(lines) == 80 and lines[0] == "line 22" and lines[-1] == "the reason is last", failed.message
    # an exit without an error leaves the message empty under this policy
    done = wait_for("the succeeder to have terminated", lambda: terminated("succeeder-logs"), timeout=20)
    assert done.exit_code == 0 and done.message is None


def test_secret_volume_follows_the_secret(kube: Cluster) -> None:
    kube.core.create_namespaced_secret(kube.ns, {"metadata": {"name": "tls"}, "stringData": {"key.pem": "v1"}})
    kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "cfg"}, "data": {"mode": "blue"}})
    app = container(readinessProbe=ready_probe(),
                    volumeMounts=[{"name": "tls", "mountPath": f"{MOUNTS}/tls", "readOnly": True},
                                  {"name": "cfg", "mountPath": f"{MOUNTS}/config"},
                                  {"name": "scratch", "mountPath": f"{MOUNTS}/scratch"}])
    kube.apps.create_namespaced_deployment(kube.ns, deployment(
        "web", {"app": "web"}, app,
        volumes=[{"name": "tls", "secret": {"secretName": "tls"}}, {"name": "cfg", "configMap": {"name": "cfg"}},
                 {"name": "scratch", "emptyDir": {}}]))
    ip = kube.ready_pod("app=web").status.pod_ip
    assert get(ip, f"/file?path={MOUNTS}/tls/key.pem") == "v1"
    assert get(ip, f"/file?path={MOUNTS}/config/mode") == "blue"
    assert not Path(f"{MOUNTS}/tls/key.pem").exists()  # mounted in the container's own mount namespace only

    changed = time.monotonic()
    kube.core.patch_namespaced_secret("tls", kube.ns, {"stringData": {"key.pem": "v2"}})
    wait_for("the new Secret content in the pod", lambda: get(ip, f"/file?path={MOUNTS}/tls/key.pem") == "v2",
             timeout=60, interval=0.05)
    print(f"\nSecret change -> file in the pod: {time.monotonic() - changed:.2f}s")
    kube.core.patch_namespaced_config_map("cfg", kube.ns, {"data": {"mode": "green"}})
    wait_for("the new ConfigMap content", lambda: get(ip, f"/file?path={MOUNTS}/config/mode") == "green", timeout=60)


def test_proxy_follows_a_selector_switch_without_failed_requests(
        kube: Cluster, api_client: client.ApiClient) -> None:
    for color in ("blue", "green"):
        kube.apps.create_namespaced_deployment(kube.ns, deployment(
            color, {"app": "web", "color": color},
            container(args=["--port", "8080", "--name", color], readinessProbe=ready_probe())))
    kube.service("web", {"app": "web", "color": "blue"})
    blue_ip = kube.ready_pod("color=blue").status.pod_ip
    kube.ready_pod("color=green")

    results: list[tuple[float, str]] = []  # (monotonic time of the answer, server name or "error: ...")
    stop = threading.Event()
    with ServiceProxy(api_client, kube.ns, "web", 0) as proxy:
        assert proxy.wait_for_backends(60) == [(blue_ip, 8080)]

        def request(path: str, timeout: float = 30) -> str:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = json.loads(resp.read())
                return body["name"] if resp.status == 200 else f"error: HTTP {resp.status}"
            except (OSError, ValueError, http.client.HTTPException) as exc:
                return f"error: {exc!r}"
            finally:
                conn.close()

        def client_loop() -> None:
            while not stop.is_set():
                results.append((time.monotonic(), request("/")))

        in_flight: list[str] = []
        loop = threading.Thread(target=client_loop)
        loop.start()
        slow = threading.Thread(target=lambda: in_flight.append(request("/slow?seconds=20", timeout=120)))
        slow.start()
        wait_for("the slow request to reach blue", lambda: get(blue_ip)["slowInFlight"] == 1, timeout=60)
        wait_for("answers from blue before the switch", lambda: len(results) >= 3, timeout=60)

        switched = time.monotonic()
        kube.core.patch_namespaced_service("web", kube.ns, {"spec": {"selector": {"app": "web", "color": "green"}}})
        first_green = wait_for("a green answer through the proxy", lambda: next(
            (t for t, name in results if t > switched and name == "green"), None), timeout=60, interval=0.02)
        assert slow.is_alive(), "the slow request ended before the switch: it shows nothing"
        wait_for("answers after the switch", lambda: len([t for t, _ in results if t > first_green]) >= 5,
                 timeout=60)
        stop.set()
        loop.join()
        slow.join()

    latency = first_green - switched
    print(f"\nselector switch -> first answer from the new Deployment: {latency:.2f}s "
          f"({len(results)} requests, none failed)")
    errors = [name for _, name in results if name.startswith("error")]
    assert errors == []
    assert in_flight == ["blue"]  # the request in flight during the switch finished on its old backend
    assert {name for t, name in results if t < switched} == {"blue"}
    assert {name for t, name in results if t > first_green} == {"green"}  # one client, one request at a time


def test_deleting_a_pod_ends_its_process_and_its_network_namespace(kube: Cluster, cluster) -> None:
    pod = bare_pod("solo", container(readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1}))
    started = time.monotonic()
    kube.core.create_namespaced_pod(kube.ns, pod)
    ready = kube.ready_pod("app=solo")
    print(f"\nPod creation -> Ready (trivial server, tcpSocket readiness probe): {time.monotonic() - started:.2f}s")
    pid = get(ready.status.pod_ip)["pid"]
    assert alive(pid)
    netns = next(n for n in podnet.list_cluster_netns(cluster.network) if ready.metadata.uid.replace("-", "")[:12] in n)
    routes = subprocess.run(["ip", "-n", netns, "route"], capture_output=True, text=True, check=True).stdout
    assert "unreachable default" in routes and cluster.state.pod_cidr in routes  # nothing leaves this machine

    kube.core.delete_namespaced_pod("solo", kube.ns)

    def gone() -> bool:
        try:
            kube.pod("solo")
        except client.ApiException as exc:
            return exc.status == 404
        return False

    wait_for("the pod removed", gone, timeout=15)
    assert not alive(pid)
    assert not any(ready.metadata.uid.replace("-", "")[:12] in n for n in podnet.list_cluster_netns(cluster.network))

    # A force delete (no graceful deletion for the agent to see) must not leave an orphan process either.
    kube.core.create_namespaced_pod(kube.ns, bare_pod("forced", container(readinessProbe=ready_probe())))
    forced = kube.ready_pod("app=forced")
    forced_pid = get(forced.status.pod_ip)["pid"]
    kube.core.delete_namespaced_pod("forced", kube.ns, grace_period_seconds=0)
    wait_for("the force-deleted pod's process ended", lambda: not alive(forced_pid), timeout=15)


def test_devcluster_down_leaves_no_process_behind_even_after_the_agent_was_killed() -> None:
    name = f"t-down-{uuid.uuid4().hex[:6]}"
    cli = [sys.executable, "-m", "devcluster", "--name", name]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    up = subprocess.run([*cli, "up", "--nodes", "1"], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=150)
    state_dir = None
    try:
        assert up.returncode == 0, up.stderr
        from devcluster.cluster import DevCluster, named_state_dir

        state_dir = named_state_dir(name)
        other = DevCluster.attach(state_dir)
        core = client.CoreV1Api(other.api_client())
        wait_for("the default ServiceAccount", lambda: core.read_namespaced_service_account("default", "default"))
        core.create_namespaced_pod("default", bare_pod("orphan", container(readinessProbe=ready_probe())))

        def ready() -> client.V1Pod | None:
            pod = core.read_namespaced_pod("orphan", "default")
            return pod if is_ready(pod) else None

        pod = wait_for("the pod Ready", ready, timeout=30)
        pid = get(pod.status.pod_ip)["pid"]
        assert other.state is not None
        os.kill(other.state.pids["agent"], signal.SIGKILL)  # nobody left to stop the pod gracefully
        time.sleep(0.5)
        assert alive(pid)
        network = other.network
        assert podnet.list_cluster_netns(network)
    finally:
        down = subprocess.run([*cli, "down"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "removed leftover netns" in down.stderr
    assert not alive(pid)
    assert podnet.list_cluster_netns(network) == []
    assert not network.exists()
    assert state_dir is not None and not state_dir.exists()


def test_volume_over_the_folder_holding_the_environment_keeps_it_and_later_sources_visible(
        kube: Cluster, tmp_path: Path) -> None:
    """An emptyDir over /tmp (what a read-only root filesystem needs) must not hide the Python environment, the
    project, or a hostPath whose source lives under /tmp, even when the project itself was cloned under /tmp."""
    import sys

    covering = Path(sys.prefix).resolve().parent.parent  # above the venv and the project: the whole checkout's parent
    (tmp_path / "weights.txt").write_text("from the host")
    (covering / "devcluster-visible-on-host.txt").write_text("host only")
    mounts = [{"name": "scratch", "mountPath": str(covering)},
              {"name": "models", "mountPath": f"{MOUNTS}/models", "readOnly": True}]
    volumes = [{"name": "scratch", "emptyDir": {}},
               {"name": "models", "hostPath": {"path": str(tmp_path), "type": "Directory"}}]
    if covering != Path("/tmp"):  # a checkout under /tmp is covered by the first volume already
        mounts.append({"name": "tmp", "mountPath": "/tmp"})
        volumes.append({"name": "tmp", "emptyDir": {}})
    app = container(readinessProbe=ready_probe(), volumeMounts=mounts)
    kube.core.create_namespaced_pod(kube.ns, bare_pod("covered", app, volumes=volumes))
    try:
        ip = kube.ready_pod("app=covered", timeout=30).status.pod_ip
        assert get(ip, f"/file?path={MOUNTS}/models/weights.txt") == "from the host"
        with pytest.raises(urllib.error.HTTPError):  # the emptyDir really covers the host's folder
            get(ip, f"/file?path={covering / 'devcluster-visible-on-host.txt'}")
    finally:
        (covering / "devcluster-visible-on-host.txt").unlink(missing_ok=True)
