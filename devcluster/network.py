"""The cluster's pod network: a Linux bridge on the host with one /16 of pod addresses behind it.

Kubernetes refuses loopback addresses in EndpointSlices (``ValidateEndpointIP``), so pods cannot use 127.x.y.z
if the real controller-manager is to keep Service endpoints. Instead each cluster owns a bridge (``dc-<id>``) with
the gateway address ``.0.1`` of its pod CIDR; pods run in network namespaces of their own, attached to that bridge
with a veth pair (see ``devcluster.podnet``). All of it lives on this machine: nothing is routed off it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass


class NetworkError(RuntimeError):
    """The pod network could not be set up; the message says what to do."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def bridge_name(cluster_name: str) -> str:
    """A stable interface name (at most 15 characters) for a cluster's bridge."""
    return "dc-" + hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


def used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-o", "-4", "addr", "show").stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def pick_pod_cidr(used: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first 10.240.0.0/16 .. 10.254.0.0/16 that overlaps nothing already on this machine."""
    for second in range(240, 255):
        candidate = ipaddress.ip_network(f"10.{second}.0.0/16")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetworkError("no free /16 in 10.240.0.0/12 for pods: stop other devclusters (python -m devcluster down)")


@dataclass(frozen=True)
class PodNetwork:
    """The bridge and address range of one cluster."""

    bridge: str
    cidr: ipaddress.IPv4Network

    @property
    def gateway(self) -> str:
        return str(self.cidr.network_address + 1)

    def pod_ip(self, index: int) -> str:
        """The address of pod slot `index` (1-based; .0.1 is the gateway, so slot 1 is .0.2)."""
        addr = self.cidr.network_address + 1 + index
        if addr >= self.cidr.broadcast_address:
            raise NetworkError(f"pod CIDR {self.cidr} is full")
        return str(addr)

    def exists(self) -> bool:
        return _ip("link", "show", self.bridge, check=False).returncode == 0

    def create(self) -> None:
        """Create the bridge with the gateway address (idempotent). Needs root (CAP_NET_ADMIN)."""
        if shutil.which("ip") is None:
            raise NetworkError("the `ip` command is missing: apt-get install iproute2")
        if os.geteuid() != 0:
            raise NetworkError("devcluster's pod network needs root (CAP_NET_ADMIN) to create a bridge")
        if not self.exists():
            proc = _ip("link", "add", self.bridge, "type", "bridge", check=False)
            if proc.returncode != 0:
                raise NetworkError(f"cannot create bridge {self.bridge}: {proc.stderr.strip()}")
        _ip("addr", "replace", f"{self.gateway}/{self.cidr.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def delete(self) -> None:
        if self.exists():
            _ip("link", "del", self.bridge, check=False)
