"""Per-pod network namespaces on the cluster bridge: what gives every process pod a real, routable pod IP.

Each pod gets a network namespace ``dcpod-<bridge id>-<uid>`` with ``lo`` up and a veth pair: ``eth0`` inside,
holding the pod IP from the agent in the cluster's pod CIDR (a /16 on the bridge), and a MAC derived from that IP;
the host end is enslaved to the cluster bridge. Every pod can therefore bind ``0.0.0.0:<containerPort>`` like in
Kubernetes, the host (tests, probes, the service proxy) reaches it at its pod IP, and the pod reaches the host (API
server, Redis: anything bound to 0.0.0.0) at the gateway address ``.0.1`` and the other pods at their IPs.

Nothing is routed off this machine: the only route is the pod CIDR, and the default route is ``unreachable``, so a
pod that tries any other address (a model hub, a DNS server) fails at once with ENETUNREACH, even on a host with
IP forwarding on. Kubernetes would give a pod a default route via its gateway; here that would only leak or hang.

Names derive from the bridge, so ``sweep`` finds every namespace and veth of a cluster even when the agent that
made them was SIGKILLed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from devcluster.network import PodNetwork

NETNS_DIR = "/run/netns"


class PodNetError(RuntimeError):
    """A pod's network namespace could not be made; the message has the failing `ip` command and its error."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise PodNetError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def netns_prefix(network: PodNetwork) -> str:
    """The name prefix of every pod network namespace of one cluster (from its bridge, `dc-<10 hex>`)."""
    return f"dcpod-{network.bridge.removeprefix('dc-')}-"


@dataclass(frozen=True)
class PodSandbox:
    """The network namespace of one pod and the host end of its veth pair."""

    netns: str
    host_veth: str
    ip: str

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"

    @classmethod
    def for_pod(cls, network: PodNetwork, uid: str, ip: str) -> PodSandbox:
        digest = hashlib.sha256(f"{network.bridge}/{uid}".encode()).hexdigest()
        return cls(netns=netns_prefix(network) + uid.replace("-", "")[:12], host_veth=f"dv{digest[:12]}", ip=ip)

    def exists(self) -> bool:
        return os.path.exists(self.netns_path)

    def create(self, network: PodNetwork) -> None:
        """Make the namespace, its veth pair and routes (idempotent: a half-made sandbox is made again)."""
        if self.exists():
            self.delete()
        peer = "dp" + self.host_veth[2:]
        _ip("link", "del", self.host_veth, check=False)
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.host_veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", self.netns)
            _ip("-n", self.netns, "link", "set", peer, "name", "eth0")
            # A MAC derived from the IP (as OVN-Kubernetes does): an address reused by a later pod keeps its MAC,
            # so the host's ARP cache never points a new pod's IP at a deleted pod's veth.
            _ip("-n", self.netns, "link", "set", "eth0", "address", pod_mac(self.ip))
            _ip("-n", self.netns, "addr", "add", f"{self.ip}/{network.cidr.prefixlen}", "dev", "eth0")
            _ip("-n", self.netns, "link", "set", "lo", "up")
            _ip("-n", self.netns, "link", "set", "eth0", "up")
            # Only the pod CIDR is routed (gateway = the host, and the other pods); everything else fails at once
            # with ENETUNREACH instead of leaving through the host (where ip_forward may be on) or hanging.
            _ip("-n", self.netns, "route", "add", "unreachable", "default")
            _ip("link", "set", self.host_veth, "master", network.bridge)
            _ip("link", "set", self.host_veth, "up")
            _ip("neigh", "flush", "to", self.ip, "dev", network.bridge, check=False)
        except PodNetError:
            self.delete()
            raise

    def pids(self) -> list[int]:
        """Every process living in this namespace (whatever started it)."""
        return netns_pids(self.netns)

    def delete(self) -> None:
        """Kill what still runs inside, then remove the namespace (which destroys the veth pair)."""
        kill_netns_processes(self.netns)
        _ip("netns", "del", self.netns, check=False)
        _ip("link", "del", self.host_veth, check=False)


def pod_mac(ip: str) -> str:
    """0a:58:<the IPv4 address in hex>: locally administered, unicast, and the same for the same address."""
    return "0a:58:" + ":".join(f"{int(octet):02x}" for octet in ip.split("."))


def netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_netns_processes(netns: str, timeout: float = 5) -> None:
    """SIGKILL every process in a namespace and wait (bounded) until they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        pids = netns_pids(netns)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # reap our own children so they do not linger as zombies
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


def list_cluster_netns(network: PodNetwork) -> list[str]:
    prefix = netns_prefix(network)
    try:
        return sorted(name for name in os.listdir(NETNS_DIR) if name.startswith(prefix))
    except FileNotFoundError:
        return []


def bridge_ports(network: PodNetwork) -> list[str]:
    out = _ip("-o", "link", "show", "master", network.bridge, check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def sweep(network: PodNetwork) -> list[str]:
    """Remove every pod namespace (killing its processes) and veth of a cluster; returns what it removed."""
    removed = []
    for netns in list_cluster_netns(network):
        kill_netns_processes(netns)
        _ip("netns", "del", netns, check=False)
        removed.append(f"netns {netns}")
    for port in bridge_ports(network):
        _ip("link", "del", port, check=False)
        removed.append(f"veth {port}")
    return removed
