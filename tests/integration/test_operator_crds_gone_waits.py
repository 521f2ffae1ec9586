"""The DeepSeekDeployment CRD deleted while a reconcile still runs (held at a failpoint, as a long verification would
be): the operator stops kopf, lets that reconcile end before it gives up its Lease and waits for the CRDs, and so
never has a standby (or its own next runtime) act beside it.

A cluster of its own: the test deletes a CRD.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conftest import FAST_OPERATOR_ENV

from devcluster.cluster import ClusterConfig, DevCluster
from devcluster.testing.crds import install_crds
from devcluster.testing.polling import wait_for
from devcluster.testing.replicas import OperatorReplica, lease_holder

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

HOLD = 20  # seconds the reconcile is held at its failpoint


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[DevCluster]:
    with DevCluster(ClusterConfig(name=f"crds-gone-{os.getpid()}", nodes=1)) as cluster:
        yield cluster


def test_a_reconcile_still_running_when_the_crd_goes_ends_before_the_lease_is_released(own_cluster):
    from kubernetes import client, config

    cluster = own_cluster
    kubeconfig = str(cluster.kubeconfig)
    install_crds(kubeconfig)
    cluster.kubectl("create", "namespace", "tenant")
    api_client = config.new_client_from_config(config_file=kubeconfig)
    leader = OperatorReplica("replica-a", kubeconfig, dict(FAST_OPERATOR_ENV), lease_namespace="tenant")
    try:
        leader.start(failpoint="rollout-none=tenant/chat", failpoint_sleep=HOLD)
        wait_for("the replica to lead", lambda: leader.holds(lease_holder(api_client, "tenant")), 60)
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            "deepseek.ai", "v1alpha1", "tenant", "deepseekdeployments", {
                "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
                "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:test"}})
        wait_for("the rollout held at the failpoint", lambda: f"holding it for {HOLD} s" in leader.log_text(), 60)
        cluster.kubectl("delete", "crd", "deepseekdeployments.deepseek.ai", "--wait=false")
        wait_for("the operator to wait for the held reconcile",
                 lambda: "waiting for 1 reconcile(s) still running to end" in leader.log_text(), 30)
        assert leader.holds(lease_holder(api_client, "tenant")), leader.log_tail()
        wait_for("the Lease to be released once the reconcile ended",
                 lambda: "released lease" in leader.log_text(), HOLD + 30)
        log = leader.log_text()
        assert log.index("failpoint rollout-none: going on") < log.index("released lease"), log[-3000:]
        assert leader.running, "the operator should wait for its CRDs, not exit:\n" + leader.log_tail()
    finally:
        leader.stop()
        api_client.close()
    assert "eyJ" not in leader.log_text()
