"""Blue-green rollouts end to end: the operator, real deepseek-server processes on a tiny model, and an OpenAI
client sending through the active Service (devcluster proxy) the whole time."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
from kubernetes import client

from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import MODEL_NAME, ContinuousClient, OperatorProcess, World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]


def completion(base_url: str, token: str) -> str:
    api = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=30)
    reply = api.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=0.7,
                                        messages=[{"role": "user", "content": "Say hello"}])
    assert reply.choices and reply.usage is not None and reply.usage.completion_tokens >= 1
    return reply.choices[0].message.content or ""


def world_wait_failed(world: World, previous_failure: str) -> dict[str, Any]:
    """Wait until a revision other than `previous_failure` has failed and been rolled back."""
    return wait_for("the next failed revision", lambda: (status := world.status()).get("failedRevision") not in (
        None, previous_failure) and (status.get("rollout") or {}).get("phase") == "Degraded" and status, 180)


def test_create_update_fast_rollback_and_broken_revision_with_zero_failed_requests(world: World) -> None:
    world.create()
    status = world.wait_phase("Completed", timeout=240)
    first = status["activeRevision"]
    assert status["activeColor"] == "blue" and status["readyReplicas"] == 1
    assert status["endpoint"] == f"http://chat.{world.namespace}.svc:8000/v1"
    assert world.condition("Ready")["status"] == "True"
    assert world.condition("CapacityAvailable")["status"] == "True"
    # the server's account may read only its own auth ConfigMaps: the index and the 16 shards it may grow into
    role = client.RbacAuthorizationV1Api(world.api_client).read_namespaced_role("chat-server", world.namespace)
    assert role.rules[0].resource_names == ["chat-auth", *(f"chat-auth-{shard}" for shard in range(16))]
    assert sorted(role.rules[0].verbs) == ["get", "watch"] and len(role.rules) == 1
    pods = world.core.list_namespaced_pod(world.namespace, label_selector="deepseek.ai/color=blue").items
    assert pods and all(p.spec.node_name for p in pods)
    assert pods[0].spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"

    token = world.create_apikey()
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy:
        base_url = proxy.url + "/v1"
        completion(base_url, token)  # answers, with at least one generated token

        with ContinuousClient(base_url, token) as traffic:
            # 1. a new model revision rolls out blue-green
            world.patch({"spec": {"model": {"revision": "v2"}}})
            second = wait_for("a new revision", lambda: (world.status().get("rollout") or {}).get("revision")
                              not in (None, first) and world.status()["rollout"]["revision"], 30)
            status = world.wait_phase("Completed", revision=second, timeout=240)
            assert status["activeColor"] == "green" and status["activeRevision"] == second
            assert world.events("RolloutStarted") and world.events("Verified") and world.events("Promoted")
            blue = world.apps.read_namespaced_deployment("chat-blue", world.namespace)
            assert blue.spec.replicas == 1, "the old color stays warm for scaleDownDelaySeconds"

            # 2. reverting the spec while blue is still warm switches back at once
            started = time.monotonic()
            world.patch({"spec": {"model": {"revision": "v1"}}})
            status = world.wait_phase("Completed", revision=first, timeout=120)
            assert status["activeColor"] == "blue" and status["activeRevision"] == first
            fast = time.monotonic() - started

            # 3. a broken revision (model path that does not exist) rolls back on its own
            world.patch({"spec": {"model": {"revision": "v3", "source": {"hostPath": {
                "path": str(world.model) + "-missing"}}}, "rollout": {"progressDeadlineSeconds": 30}}})
            status = world.wait_phase("Degraded", timeout=180)
            broken = status["failedRevision"]
            assert broken not in (first, second)
            assert status["activeColor"] == "blue" and status["activeRevision"] == first
            degraded = world.condition("Degraded")
            # a hostPath that does not exist is hopeless at once: rolled back without waiting for the deadline
            assert degraded["status"] == "True" and degraded["reason"] == "FailedMount"
            assert world.condition("Ready")["status"] == "True"
            assert world.events("RolledBack")
            # no retry loop: the failed revision is not started again by later reconciles
            starts = len(world.events("RolloutStarted"))
            world.reconciled()
            world.reconciled()
            assert len(world.events("RolloutStarted")) == starts
            assert world.status()["rollout"]["phase"] == "Degraded"
            green = world.apps.read_namespaced_deployment("chat-green", world.namespace)
            assert green.spec.replicas == 0, "the failed color gives its GPUs back"

            # 4. the retry annotation starts it exactly once more
            world.annotate("deepseek.ai/retry", broken)
            wait_for("the retried rollout", lambda: len(world.events("RolloutStarted")) == starts + 1, 30)
            world.wait_phase("Degraded", revision=broken, timeout=180)
            world.reconciled()
            assert len(world.events("RolloutStarted")) == starts + 1
            assert world.status()["retriedRevision"] == broken

            # 5. a revision whose server gets Ready but answers 500 fails verification and never gets traffic
            world.patch({"spec": {"model": {"revision": "v4", "source": {"hostPath": {
                "path": str(world.model) + "-nan"}}}}})
            status = world_wait_failed(world, broken)
            assert status["activeColor"] == "blue" and status["activeRevision"] == first
            degraded = world.condition("Degraded")
            assert degraded["reason"] == "VerificationFailed" and "HTTP 500" in degraded["message"]

        assert traffic.ok > 20
        assert traffic.failures == [], f"{len(traffic.failures)} failed requests: {traffic.failures[:5]}"
    assert fast < 30, f"fast rollback took {fast:.1f}s"
    history = world.status()["history"]
    assert [h["result"] for h in history][:2] == ["RolledBack", "RolledBack"]


# failpoint -> the phase status shows after the operator died there
KILL_POINTS = [("rollout-Provisioning", "Provisioning"), ("rollout-Starting", "Starting"),
               ("rollout-Verifying", "Verifying"), ("rollout-Promoting", "Promoting"),
               ("rollout-before-switch", "Promoting"), ("rollout-PostVerifying", "PostVerifying")]


def test_operator_killed_in_each_rollout_phase_resumes(world: World, operator: OperatorProcess) -> None:
    world.create()
    first = world.wait_phase("Completed", timeout=240)["activeRevision"]
    token = world.create_apikey()
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            ContinuousClient(proxy.url + "/v1", token) as traffic:
        operator.stop()
        operator.start(failpoint=KILL_POINTS[0][0])
        world.patch({"spec": {"model": {"revision": "v2"}}})
        for index, (failpoint, phase) in enumerate(KILL_POINTS):
            assert operator.wait_exit(120) == -9, f"not killed at {failpoint}:\n{operator.log_tail()}"
            assert world.status()["rollout"]["phase"] == phase, failpoint
            selector = world.core.read_namespaced_service("chat", world.namespace).spec.selector
            # traffic moves only after the Promoting step switched it
            assert selector["deepseek.ai/color"] == ("green" if phase == "PostVerifying" else "blue"), failpoint
            operator.start(failpoint=KILL_POINTS[index + 1][0] if index + 1 < len(KILL_POINTS) else None)
        status = world.wait_phase("Completed", timeout=180)
        second = status["activeRevision"]
        assert second != first and status["activeColor"] == "green"
        assert len(world.events("Promoted")) >= 2

        # killed while rolling back an aborted revision: the restarted operator finishes the rollback
        operator.stop()
        operator.start(failpoint="rollout-RollingBack")
        world.patch({"spec": {"model": {"revision": "v3", "source": {"hostPath": {
            "path": str(world.model) + "-missing"}}}}})
        third = world.wait_phase("Starting", timeout=60)["rollout"]["revision"]
        world.annotate("deepseek.ai/abort", third)
        assert operator.wait_exit(60) == -9, operator.log_tail()
        assert world.status()["rollout"]["phase"] == "RollingBack"
        operator.start()
        status = world.wait_phase("Degraded", revision=third, timeout=60)
        assert status["activeColor"] == "green" and status["activeRevision"] == second
        assert status["failedRevision"] == third
    assert traffic.failures == [], f"{len(traffic.failures)} failed requests: {traffic.failures[:5]}"


def test_manual_promotion_and_abort(world: World) -> None:
    rollout = {"autoPromote": False, "progressDeadlineSeconds": 180, "scaleDownDelaySeconds": 600,
               "analysis": {"requests": 2, "windowSeconds": 2, "maxLatencyMs": 20000}}
    world.create(rollout=rollout)
    first = world.wait_phase("Completed", timeout=240)["activeRevision"]  # the first revision needs no promotion

    world.patch({"spec": {"model": {"revision": "v2"}}})
    status = world.wait_phase("AwaitingPromotion", timeout=180)
    second = status["rollout"]["revision"]
    assert world.condition("Progressing")["reason"] == "AwaitingPromotion"
    assert f"deepseek.ai/promote={second}" in status["rollout"]["message"]
    world.annotate("deepseek.ai/promote", first)  # a promotion for another revision does nothing
    world.reconciled()
    assert world.status()["rollout"]["phase"] == "AwaitingPromotion" and world.status()["activeColor"] == "blue"
    world.annotate("deepseek.ai/promote", second)
    status = world.wait_phase("Completed", revision=second, timeout=180)
    assert status["activeColor"] == "green"

    world.patch({"spec": {"model": {"revision": "v3"}}})
    third = world.wait_phase("AwaitingPromotion", timeout=180)["rollout"]["revision"]
    world.annotate("deepseek.ai/abort", third)
    status = world.wait_phase("Degraded", revision=third, timeout=60)
    assert status["activeColor"] == "green" and status["activeRevision"] == second
    assert status["failedRevision"] == third and status["history"][0]["result"] == "Aborted"
    assert world.condition("Degraded")["reason"] == "Aborted"
    service = world.core.read_namespaced_service("chat", world.namespace)
    assert service.spec.selector["deepseek.ai/revision"] == second

    # retried with kubectl annotate alone, the aborted revision starts without the abort of its failed attempt
    # (left set, it rolled the new attempt back at once) and waits for a promotion of its own
    world.annotate("deepseek.ai/retry", third)
    [cleared] = world.wait_event("AnnotationsCleared")
    assert f"deepseek.ai/abort={third}" in cleared.message
    status = world.wait_phase("AwaitingPromotion", revision=third, timeout=180)
    assert "deepseek.ai/abort" not in (world.get()["metadata"].get("annotations") or {})
    assert status["desiredRevision"] == third and status["retriedRevision"] == third
    world.annotate("deepseek.ai/promote", third)
    status = world.wait_phase("Completed", revision=third, timeout=180)
    assert status["activeColor"] == "blue" and "failedRevision" not in status

    # turning autoPromote on promotes the verified revision that waits for its annotation
    world.patch({"spec": {"model": {"revision": "v4"}}})
    fourth = world.wait_phase("AwaitingPromotion", timeout=180)["rollout"]["revision"]
    world.patch({"spec": {"rollout": {"autoPromote": True}}})
    status = world.wait_phase("Completed", revision=fourth, timeout=180)
    assert status["activeRevision"] == fourth and status["activeColor"] == "green"


def _startup_seconds(world: World, color: str) -> int:
    """How long the server's startup probe in `color`'s pod template allows for loading."""
    deployment = world.apps.read_namespaced_deployment(f"chat-{color}", world.namespace)
    server = next(c for c in deployment.spec.template.spec.containers if c.name == "server")
    return server.startup_probe.failure_threshold * server.startup_probe.period_seconds


def test_a_revision_failed_under_tight_rollout_settings_is_retried_once_they_change(world: World) -> None:
    """A revision rolled back because the analysis was too strict (or the deadline too short for its load) is tried
    once more when those settings change, with no spec change to the revision and no retry annotation, and its pods
    start with a startup probe sized to the new deadline."""
    world.create()
    first = world.wait_phase("Completed", timeout=240)["activeRevision"]

    world.patch({"spec": {"model": {"revision": "v2"}, "rollout": {
        "progressDeadlineSeconds": 120, "analysis": {"maxLatencyMs": 1}}}})
    status = world_wait_failed(world, first)
    second = status["failedRevision"]
    assert status["rollout"]["reason"] == "VerificationFailed" and status["activeRevision"] == first
    assert status["failedSettings"]["progressDeadlineSeconds"] == 120
    assert status["failedSettings"]["analysis"]["maxLatencyMs"] == 1
    assert "its rollout settings (progressDeadlineSeconds, strategy, previewReplicas, analysis) change" in \
        world.condition("Degraded")["message"]
    assert _startup_seconds(world, "green") == 120
    # settings that judge nothing leave it failed
    world.patch({"spec": {"rollout": {"scaleDownDelaySeconds": 500}}})
    world.reconciled()
    assert world.status()["rollout"]["phase"] == "Degraded" and not world.events("RetryingRevision")

    world.patch({"spec": {"rollout": {"progressDeadlineSeconds": 240, "analysis": {"maxLatencyMs": 20000}}}})
    [event] = world.wait_event("RetryingRevision")
    assert event.message == (f"revision {second} failed under other rollout settings; trying it once under these: "
                             "analysis.maxLatencyMs 1 -> 20000, progressDeadlineSeconds 120 -> 240")
    status = world.wait_phase("Completed", revision=second, timeout=240)
    assert status["activeRevision"] == second and status["activeColor"] == "green"
    assert "failedRevision" not in status and "failedSettings" not in status
    assert status["rollout"]["settings"]["progressDeadlineSeconds"] == 240
    assert _startup_seconds(world, "green") == 240
    assert world.condition("Degraded")["status"] == "False"


def _free_gpus(core: client.CoreV1Api, node: str) -> int:
    allocatable = int(core.read_node(node).status.allocatable["nvidia.com/gpu"])
    used = 0
    for pod in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items:
        if pod.status.phase in ("Succeeded", "Failed"):
            continue
        for container in pod.spec.containers:
            used += int(((container.resources.requests or {}) if container.resources else {}).get(
                "nvidia.com/gpu", 0))
    return allocatable - used


def _blockers(world: World, node: str, count: int) -> None:
    """A Deployment of simulated pods (an image devcluster does not run as a process) holding one GPU each."""
    body = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "gpu-blocker"},
        "spec": {"replicas": count, "selector": {"matchLabels": {"app": "gpu-blocker"}},
                 "template": {"metadata": {"labels": {"app": "gpu-blocker"}}, "spec": {
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [{"name": "hold", "image": "registry.example/gpu-blocker:1",
                                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}},
    }
    try:
        world.apps.create_namespaced_deployment(world.namespace, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        world.apps.patch_namespaced_deployment_scale("gpu-blocker", world.namespace, {"spec": {"replicas": count}})


def test_gpu_shortage_keeps_serving_and_preview_replicas_let_the_rollout_complete(world: World) -> None:
    node = "gpu-node-1"

    def others_gone() -> bool:
        pods = world.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}").items
        return not [p for p in pods if p.metadata.namespace != world.namespace]

    wait_for("the GPU node to be free of earlier tests' pods", others_gone, 120)
    free = _free_gpus(world.core, node)
    assert free >= 3
    _blockers(world, node, free - 2)  # leaves exactly two GPUs: room for one color of two replicas
    wait_for("blockers scheduled", lambda: _free_gpus(world.core, node) == 2, 60)
    world.create(replicas=2, scheduling={"nodeSelector": {"kubernetes.io/hostname": node}},
                 rollout={"previewReplicas": 1, "progressDeadlineSeconds": 240, "scaleDownDelaySeconds": 600,
                          "analysis": {"requests": 2, "windowSeconds": 2, "maxLatencyMs": 20000}})
    first = world.wait_phase("Completed", timeout=240)["activeRevision"]
    token = world.create_apikey()
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            ContinuousClient(proxy.url + "/v1", token) as traffic:
        world.patch({"spec": {"model": {"revision": "v2"}}})
        wait_for("CapacityAvailable=False", lambda: world.condition("CapacityAvailable").get("status") == "False", 60)
        capacity = world.condition("CapacityAvailable")
        assert capacity["reason"] == "InsufficientGPU"
        assert "Insufficient nvidia.com/gpu" in capacity["message"] and "1 more needed" in capacity["message"]
        world.reconciled()
        assert world.condition("Ready")["status"] == "True" and world.status()["activeRevision"] == first
        ok_before = traffic.ok

        # one GPU comes free: enough for one preview replica, not for a second full color
        _blockers(world, node, free - 3)
        status = world.wait_phase("Completed", revision=world.status()["rollout"]["revision"], timeout=240)
        assert status["activeColor"] == "green" and status["readyReplicas"] == 2
        assert world.events("CapacityHandover"), "the old color handed GPUs over one replica at a time"
        assert world.condition("CapacityAvailable")["status"] == "True"
    assert traffic.ok > ok_before
    assert traffic.failures == [], f"{len(traffic.failures)} failed requests: {traffic.failures[:5]}"


def test_old_color_scales_to_zero_after_the_delay_and_deleting_removes_everything(world: World) -> None:
    world.create(replicas=2, rollout={"scaleDownDelaySeconds": 3,
                                      "analysis": {"requests": 2, "windowSeconds": 0, "maxLatencyMs": 20000}})
    world.wait_phase("Completed", timeout=240)
    world.patch({"spec": {"model": {"revision": "v2"}}})
    wait_for("a rollout of v2", lambda: (world.status().get("rollout") or {}).get("color") == "green", 30)
    status = world.wait_phase("Completed", timeout=240)
    assert status["activeColor"] == "green" and status["readyReplicas"] == 2
    wait_for("blue scaled to zero", lambda: world.apps.read_namespaced_deployment(
        "chat-blue", world.namespace).spec.replicas == 0, 60)
    assert world.wait_event("ScaledDown")  # recorded after the scale it explains
    # replicas changes scale the active color without a rollout
    rollouts = len(world.events("RolloutStarted"))
    world.patch({"spec": {"replicas": 1}})
    wait_for("green scaled to one", lambda: world.apps.read_namespaced_deployment(
        "chat-green", world.namespace).spec.replicas == 1, 30)
    assert len(world.events("RolloutStarted")) == rollouts and world.status()["rollout"]["phase"] == "Completed"
    world.create_apikey()
    world.custom.delete_namespaced_custom_object("deepseek.ai", "v1alpha1", world.namespace, "deepseekdeployments",
                                                 "chat")

    def leftovers() -> list[str]:
        names = [d.metadata.name for d in world.apps.list_namespaced_deployment(world.namespace).items]
        names += [s.metadata.name for s in world.core.list_namespaced_service(world.namespace).items]
        names += [a.metadata.name for a in world.core.list_namespaced_service_account(world.namespace).items
                  if a.metadata.name != "default"]
        names += [p.metadata.name for p in world.core.list_namespaced_pod(world.namespace).items]
        return names

    wait_for("garbage collection of the deployment's children", lambda: not leftovers() or None, 90)

    def key_reason() -> str | None:
        key = world.custom.get_namespaced_custom_object("deepseek.ai", "v1alpha1", world.namespace, "apikeys", "alice")
        ready = next((c for c in (key.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})
        return ready.get("reason") if ready.get("status") == "False" else None

    assert wait_for("the ApiKey to report its deployment gone", key_reason, 60) == "DeploymentNotFound"


def test_recreate_strategy_stops_the_old_color_before_starting_the_new(world: World) -> None:
    world.create(rollout={"strategy": "Recreate", "analysis": {"requests": 1, "windowSeconds": 0}})
    first = world.wait_phase("Completed", timeout=240)["activeRevision"]
    world.patch({"spec": {"model": {"revision": "v2"}}})
    wait_for("a rollout of v2", lambda: (world.status().get("rollout") or {}).get("revision") not in (None, first), 30)

    def overlap() -> bool:
        pods = world.core.list_namespaced_pod(world.namespace).items
        return {p.metadata.labels.get("deepseek.ai/color") for p in pods if p.status.phase == "Running"} == {
            "blue", "green"}

    deadline = time.monotonic() + 240
    while (world.status().get("rollout") or {}).get("phase") != "Completed" and time.monotonic() < deadline:
        assert not overlap(), "Recreate must never run both colors at once"
        time.sleep(0.2)
    status = world.status()
    assert status["rollout"]["phase"] == "Completed" and status["activeColor"] == "green"
    assert world.apps.read_namespaced_deployment("chat-blue", world.namespace).spec.replicas == 0
