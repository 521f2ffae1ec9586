"""devcluster: a real Kubernetes control plane on one machine, with no container runtime."""

from devcluster.cluster import ClusterConfig, ClusterError, DevCluster

__all__ = ["ClusterConfig", "ClusterError", "DevCluster"]
