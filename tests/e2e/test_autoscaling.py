"""Autoscaling on devcluster with real servers (tiny model) and real streams through the Service: replicas follow a
1 -> 16 -> 1 ramp within the stabilization windows with no failed request; at maxReplicas without GPUs for them it
reports CapacityAvailable=False and holds; during a rollout it holds and the new color starts at the active count.

Short windows and a 1 s look interval keep it to minutes; every wait polls a condition with a generous deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import E2E_OPERATOR_ENV, OperatorProcess, World, wait_for
from devcluster.testing.load import StreamLoad

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500)]

UP_WINDOW, DOWN_WINDOW = 5, 20
LOOK_INTERVAL = 1  # DEEPSEEK_OPERATOR_AUTOSCALE_INTERVAL below: status shows a reading up to one interval after it


@pytest.fixture(scope="module")
def operator(e2e_crds, kubeconfig) -> Iterator[OperatorProcess]:
    process = OperatorProcess(kubeconfig, {**E2E_OPERATOR_ENV, "DEEPSEEK_OPERATOR_AUTOSCALE_INTERVAL": "1s"})
    process.start()
    yield process
    process.stop()


def autoscaling(**overrides: Any) -> dict[str, Any]:
    # 2 in flight per replica: 16 streams ask for 3 replicas even when a loaded client keeps only 5 in flight
    return {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetPerReplica": 2,
            "scaleUp": {"stabilizationWindowSeconds": UP_WINDOW},
            "scaleDown": {"stabilizationWindowSeconds": DOWN_WINDOW}, **overrides}


SERVER = {"precision": "fp32", "maxNewTokens": 48, "maxBatchSize": 8, "shutdownGraceSeconds": 30}


def scaling(world: World) -> dict[str, Any]:
    return world.status().get("autoscaling") or {}


def server_pods(world: World, color: str | None = None) -> list[Any]:
    selector = "deepseek.ai/deployment=chat" + (f",deepseek.ai/color={color}" if color else "")
    return [pod for pod in world.core.list_namespaced_pod(world.namespace, label_selector=selector).items
            if pod.metadata.deletion_timestamp is None]


def replicas_of(world: World, color: str) -> int:
    return int(world.apps.read_namespaced_deployment(f"chat-{color}", world.namespace).spec.replicas or 0)


def start(world: World, **overrides: Any) -> str:
    world.create(autoscaling=autoscaling(**overrides.pop("autoscaling", {})), server=dict(SERVER), **overrides)
    world.wait_phase("Completed", timeout=300)
    wait_for("the autoscaler's first decision", lambda: scaling(world).get("desiredReplicas") == 1, 120)
    return world.create_apikey()


def test_replicas_follow_a_load_ramp_without_failed_requests(world: World) -> None:
    token = start(world)
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            StreamLoad(proxy.url + "/v1", token, workers=16) as load:
        load.set_concurrency(1)
        wait_for("answers at one stream", lambda: load.answered() >= 5, 120)
        assert scaling(world)["desiredReplicas"] == 1 and replicas_of(world, "blue") == 1

        ramp_up = time.monotonic()
        load.set_concurrency(16)
        wait_for("3 ready replicas under 16 streams",
                 lambda: scaling(world).get("desiredReplicas") == 3 and world.status().get("readyReplicas") == 3, 420)
        up_seconds = time.monotonic() - ramp_up
        assert up_seconds >= UP_WINDOW, "scaled up before the up-window was over"
        status = scaling(world)
        assert status["lastScaleReason"] and "in flight" in status["lastScaleReason"]
        world.wait_event("ScaledUp")
        served_at_peak = load.answered()
        # The down-window runs from the operator's last reading above target. The 16-stream client can dip to two
        # requests in flight for a moment before the ramp-down, and the operator rightly reads that as 1 replica: the
        # window is measured from the last recommendation above 1 the test saw, or the ramp-down if that is earlier.
        last_above = [time.monotonic()]

        def noting_above() -> dict[str, Any]:
            """`status.autoscaling`, noting the time when it recommends more than one replica."""
            now = scaling(world)
            if (now.get("recommendedReplicas") or 0) > 1:
                last_above[0] = time.monotonic()
            return now

        wait_for("traffic on three replicas",
                 lambda: noting_above() is not None and load.answered() >= served_at_peak + 20, 180)
        ramp_down = time.monotonic()
        load.set_concurrency(1)
        wait_for("back to 1 replica at one stream",
                 lambda: noting_above().get("desiredReplicas") == 1 and len(server_pods(world, "blue")) == 1, 420)
        down_seconds = time.monotonic() - min(ramp_down, last_above[0])
        assert down_seconds >= DOWN_WINDOW - LOOK_INTERVAL, (
            f"scaled down {down_seconds:.1f} s after the load was last above target: before the down-window was over")
        served_after = load.answered()
        wait_for("traffic on the remaining replica", lambda: load.answered() >= served_after + 5, 120)
    assert load.failures == [], f"{len(load.failures)} failed request(s): {load.failures[:5]}"
    world.wait_event("ScaledDown")
    assert world.status()["rollout"]["phase"] == "Completed"  # scaling never started a rollout
    assert len(world.status().get("history") or []) == 1


def test_max_replicas_without_gpus_reports_capacity_and_holds(world: World) -> None:
    # Each replica takes all 8 GPUs of a node: two fit on devcluster's two nodes, the third cannot be placed.
    token = start(world, resources={"gpus": 8})
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            StreamLoad(proxy.url + "/v1", token, workers=16) as load:
        load.set_concurrency(16)

        def short() -> dict[str, Any] | None:
            condition = world.condition("CapacityAvailable")
            return condition if condition.get("status") == "False" else None

        condition = wait_for("CapacityAvailable=False", short, 420)
        assert condition["reason"] == "InsufficientGPU"
        assert "the autoscaler wants 3 replica(s)" in condition["message"]
        assert "pending for GPUs" in condition["message"]
        wait_for("two replicas ready", lambda: world.status().get("readyReplicas") == 2, 300)
        held = scaling(world)
        # It holds: the count does not move while the GPUs stay short (pending pods are no capacity either way).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = scaling(world)
            assert now["desiredReplicas"] == 3 and replicas_of(world, "blue") == 3, now
            assert now.get("lastScaleTime") == held.get("lastScaleTime"), now
            time.sleep(1)
        assert world.condition("CapacityAvailable")["status"] == "False"
        warnings = world.events("InsufficientCapacity")
        assert len(warnings) == 1 and warnings[0].type == "Warning", warnings
        assert "1 pending for GPUs" in warnings[0].message
    assert load.failures == [], f"{len(load.failures)} failed request(s): {load.failures[:5]}"


def test_autoscaler_holds_during_a_rollout_and_the_new_color_starts_at_the_active_count(world: World) -> None:
    token = start(world, rollout={"progressDeadlineSeconds": 300, "scaleDownDelaySeconds": 30,
                                  "analysis": {"requests": 2, "windowSeconds": 3, "maxLatencyMs": 30000}})
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            StreamLoad(proxy.url + "/v1", token, workers=16) as load:
        load.set_concurrency(16)
        wait_for("3 ready replicas", lambda: world.status().get("readyReplicas") == 3, 420)
        scaled_up = len(world.events("ScaledUp"))

        world.patch({"spec": {"server": {"maxNewTokens": 64},
                              "rollout": {"autoPromote": False}}})
        status = world.wait_phase("AwaitingPromotion", timeout=420)
        revision = status["rollout"]["revision"]
        load.set_concurrency(1)
        # Longer than the down-window at a load of one stream: it would scale down if it did not hold.
        deadline = time.monotonic() + DOWN_WINDOW + 10
        while time.monotonic() < deadline:
            now = scaling(world)
            assert now["desiredReplicas"] == 3 and replicas_of(world, "blue") == 3, now
            time.sleep(1)
        assert "while the rollout is AwaitingPromotion" in scaling(world)["message"]

        world.annotate("deepseek.ai/promote", revision)
        world.wait_phase("Completed", revision=revision, timeout=420)
        assert world.status()["activeColor"] == "green"
        assert replicas_of(world, "green") == 3, "the new color did not start at the active color's count"
        assert len(world.events("ScaledUp")) == scaled_up  # nothing scaled during the rollout
        wait_for("green back to 1 replica after the rollout",
                 lambda: scaling(world).get("desiredReplicas") == 1 and len(server_pods(world, "green")) == 1, 420)
    assert load.failures == [], f"{len(load.failures)} failed request(s): {load.failures[:5]}"
