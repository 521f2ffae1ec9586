"""The node agent: simulated GPU nodes kept Ready, and the pods bound to them run and reported honestly.

One process per cluster (``python -m devcluster.agent --state-dir DIR``), started by DevCluster. It registers
``gpu-node-1..N`` with ``nvidia.com/gpu`` capacity, renews their Leases and heartbeats, and for every pod the real
scheduler binds to them picks a runtime: pods whose image matches a configured mapping run as local processes
(``devcluster.processes``), the rest are simulated (Running and Ready at once). Deleted pods are stopped with their
grace period and then removed, so none stays Terminating.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from devcluster.network import PodNetwork
from devcluster.runtime import Pod, PodRuntime, SimulatedRuntime, now_rfc3339, pod_key

log = logging.getLogger("devcluster.agent")

HEARTBEAT_SECONDS = 10
TICK_SECONDS = 0.2
KUBELET_VERSION = "v1.37.2"


def build_node(name: str, gpus: int, gpu_product: str, gpu_resource: str, address: str) -> dict[str, Any]:
    """The Node object of one simulated GPU node."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti", gpu_resource: str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "devcluster-gpu", "nvidia.com/gpu.product": gpu_product,
            "nvidia.com/gpu.count": str(gpus), "nvidia.com/gpu.present": "true",
            "devcluster.deepseek.ai/node": "true",
        }},
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity,
                   "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
                   "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "containerRuntimeVersion": "devcluster://1",
                                "operatingSystem": "linux", "architecture": "amd64", "osImage": "devcluster",
                                "kernelVersion": "", "machineID": name, "systemUUID": name, "bootID": name,
                                "kubeProxyVersion": ""}},
    }


def node_conditions(heartbeat: str, since: str) -> list[dict[str, Any]]:
    def cond(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return {"type": kind, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": heartbeat, "lastTransitionTime": since}

    return [
        cond("Ready", "True", "KubeletReady", "devcluster agent is posting ready status"),
        cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "simulated"),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "simulated"),
        cond("PIDPressure", "False", "KubeletHasSufficientPID", "simulated"),
        cond("NetworkUnavailable", "False", "RouteCreated", "devcluster bridge"),
    ]


def image_matches(pod: Pod, patterns: dict[str, list[str]]) -> bool:
    return any(fnmatch.fnmatch(c.get("image", ""), pat) for c in pod["spec"].get("containers", [])
               for pat in patterns)


class NodeAgent:
    """Keeps the nodes Ready and the pods bound to them in step with their runtimes."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state = json.loads((state_dir / "state.json").read_text())
        self.cfg = state["config"]
        import ipaddress

        self.network = PodNetwork(state["bridge"], ipaddress.ip_network(state["pod_cidr"]))
        self.network_enabled = bool(state.get("network"))
        kube_cfg = client.Configuration()
        config.load_kube_config(config_file=str(state_dir / "agent.kubeconfig"), client_configuration=kube_cfg)
        self.api = client.ApiClient(kube_cfg)
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.nodes = [f"gpu-node-{i + 1}" for i in range(int(self.cfg["nodes"]))]
        self.pods: dict[str, Pod] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.written: dict[str, dict[str, Any]] = {}
        self.ips: dict[str, str] = {}  # pod uid -> IP
        self.deleting: set[str] = set()
        self.simulated = SimulatedRuntime()
        self.process_runtime: PodRuntime | None = self._process_runtime()
        self.since = now_rfc3339()

    def _process_runtime(self) -> PodRuntime | None:
        if not self.cfg.get("image_commands"):
            return None
        try:
            from devcluster.processes import ProcessRuntime
        except ImportError:
            return None
        return ProcessRuntime(api=self.api, state_dir=self.state_dir, network=self.network,
                              image_commands=self.cfg["image_commands"], enabled=self.network_enabled)

    def runtime_for(self, pod: Pod) -> PodRuntime:
        if self.process_runtime is not None and image_matches(pod, self.cfg["image_commands"]):
            return self.process_runtime
        return self.simulated

    # ------------------------------------------------------------ nodes
    def register_nodes(self) -> None:
        for name in self.nodes:
            body = build_node(name, int(self.cfg["gpus_per_node"]), self.cfg["gpu_product"], "nvidia.com/gpu",
                              self.network.gateway)
            try:
                self.core.create_node(body)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(name, {"metadata": {"labels": body["metadata"]["labels"]}})
            self.core.patch_node_status(name, {"status": {**body["status"],
                                                          "conditions": node_conditions(now_rfc3339(), self.since)}})
        self.renew_leases()

    def renew_leases(self) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        for name in self.nodes:
            body = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}}
            try:
                self.coord.patch_namespaced_lease(name, "kube-node-lease", {"spec": body["spec"]})
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                try:
                    self.coord.create_namespaced_lease("kube-node-lease", body)
                except client.ApiException as exc2:
                    if exc2.status != 409:
                        raise

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.renew_leases()
                for name in self.nodes:
                    self.core.patch_node_status(name, {"status": {"conditions": node_conditions(now_rfc3339(),
                                                                                                 self.since)}})
            except Exception:  # keep heartbeating through API hiccups
                log.exception("heartbeat failed")

    # ------------------------------------------------------------ pods
    def watch_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces()
                fresh = {}
                for item in listing.items:
                    pod = self.api.sanitize_for_serialization(item)
                    if pod["spec"].get("nodeName") in self.nodes:
                        fresh[pod_key(pod)] = pod
                with self.lock:
                    self.pods = fresh
                stream = watch.Watch().stream(self.core.list_pod_for_all_namespaces,
                                              resource_version=listing.metadata.resource_version,
                                              timeout_seconds=300)
                for event in stream:
                    if self.stopping.is_set():
                        return
                    pod = self.api.sanitize_for_serialization(event["object"])
                    if pod["spec"].get("nodeName") not in self.nodes:
                        continue
                    key = pod_key(pod)
                    with self.lock:
                        if event["type"] == "DELETED":
                            self.pods.pop(key, None)
                        else:
                            self.pods[key] = pod
            except Exception:
                if not self.stopping.is_set():
                    log.exception("pod watch failed; listing again")
                    time.sleep(1)

    def allocate_ip(self, pod: Pod) -> str:
        uid = pod["metadata"]["uid"]
        if uid in self.ips:
            return self.ips[uid]
        existing = (pod.get("status") or {}).get("podIP")
        used = set(self.ips.values())
        if existing and existing not in used:
            self.ips[uid] = existing
            return existing
        slot = 1
        while self.network.pod_ip(slot) in used:
            slot += 1
        self.ips[uid] = self.network.pod_ip(slot)
        return self.ips[uid]

    def tick(self) -> None:
        with self.lock:
            pods = dict(self.pods)
        live_uids = {p["metadata"]["uid"] for p in pods.values()}
        for uid in list(self.ips):
            if uid not in live_uids and uid not in self.deleting:
                self.ips.pop(uid, None)
        # A pod removed without a graceful delete (--force --grace-period=0) must not keep running.
        for runtime in (self.simulated, self.process_runtime):
            if runtime is not None:
                runtime.retain(live_uids | self.deleting)
        for key, pod in pods.items():
            phase = (pod.get("status") or {}).get("phase")
            if pod["metadata"].get("deletionTimestamp"):
                self.begin_delete(pod)
                continue
            if phase in ("Succeeded", "Failed"):
                continue
            try:
                status = self.runtime_for(pod).sync(pod, self.allocate_ip(pod), self.network.gateway)
            except Exception:
                log.exception("sync of %s failed", key)
                continue
            if self.written.get(pod["metadata"]["uid"]) != status:
                try:
                    self.core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                          {"status": status})
                    self.written[pod["metadata"]["uid"]] = status
                except client.ApiException as exc:
                    if exc.status != 404:
                        log.warning("status of %s not written: %s", key, exc.reason)

    def begin_delete(self, pod: Pod) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.deleting:
            return
        self.deleting.add(uid)
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)

        def finish() -> None:
            try:
                self.runtime_for(pod).stop(pod, float(grace))
                self.core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                grace_period_seconds=0,
                                                body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                            preconditions={"uid": uid}))
            except client.ApiException as exc:
                if exc.status not in (404, 409):
                    log.warning("delete of %s failed: %s", pod_key(pod), exc.reason)
            except Exception:
                log.exception("stopping %s failed", pod_key(pod))
            finally:
                self.written.pop(uid, None)
                self.ips.pop(uid, None)
                self.deleting.discard(uid)

        threading.Thread(target=finish, name=f"delete-{pod_key(pod)}", daemon=True).start()

    def run(self) -> None:
        self.register_nodes()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.watch_loop, name="pod-watch", daemon=True).start()
        log.info("agent running nodes %s", ", ".join(self.nodes))
        while not self.stopping.wait(TICK_SECONDS):
            self.tick()

    def shutdown(self) -> None:
        self.stopping.set()
        if self.process_runtime is not None:
            self.process_runtime.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devcluster.agent")
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    agent = NodeAgent(args.state_dir)

    def on_signal(signum: int, frame: object) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.run()
    finally:
        agent.shutdown()


if __name__ == "__main__":
    main()
