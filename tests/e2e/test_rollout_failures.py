"""Rollouts that cannot succeed end early, with the reason Kubernetes shows, instead of at the progress deadline:
a server process crash-looping on devcluster, a model directory the server cannot load, and a hostPath that is not
on the node. One that can still succeed keeps its deadline: a Secret that is not there yet."""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from kubernetes import client

from devcluster.testing.bluegreen import World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

DEADLINE = 600


def _wait_degraded(world: World, timeout: float) -> dict:
    return wait_for("the rollout to be rolled back", lambda: (status := world.status()).get("failedRevision")
                    and (status.get("rollout") or {}).get("phase") == "Degraded" and status, timeout)


def test_a_crash_looping_server_is_rolled_back_long_before_the_deadline(world: World) -> None:
    started = time.monotonic()
    # devcluster runs this image as its stdlib test server, which refuses deepseek-server's arguments and exits.
    world.create(image="devcluster-testserver:exits-at-once", rollout={"progressDeadlineSeconds": DEADLINE})
    status = _wait_degraded(world, 240)
    assert time.monotonic() - started < DEADLINE / 2
    assert status["rollout"]["reason"] == "CrashLoopBackOff"
    assert "restarted" in status["rollout"]["message"]
    degraded = world.condition("Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "CrashLoopBackOff"
    assert world.events("RolledBack")


def test_a_model_the_server_cannot_load_is_rolled_back_with_the_servers_reason(world: World) -> None:
    # the directory is there (so the mount works) but holds no model: the server exits and says why, last
    empty = Path(tempfile.gettempdir()) / f"deepseek-empty-model-{world.namespace}"  # under the allowed prefix
    empty.mkdir(exist_ok=True)
    started = time.monotonic()
    world.create(model={"name": "tiny-chat", "revision": "v1", "source": {"hostPath": {"path": str(empty)}}},
                 rollout={"progressDeadlineSeconds": DEADLINE})
    status = _wait_degraded(world, 240)
    assert time.monotonic() - started < DEADLINE / 2
    assert status["rollout"]["reason"] == "CrashLoopBackOff"
    assert "exit code 1: " in status["rollout"]["message"]
    assert "is not a directory holding config.json and weights" in status["rollout"]["message"]
    assert world.condition("Degraded")["reason"] == "CrashLoopBackOff"
    empty.rmdir()


def test_a_missing_host_path_is_rolled_back_with_failed_mount(world: World) -> None:
    missing = f"{tempfile.gettempdir()}/deepseek-missing-model-{world.namespace}"  # under the allowed prefix
    started = time.monotonic()
    world.create(model={"name": "tiny-chat", "revision": "v1", "source": {"hostPath": {"path": missing}}},
                 rollout={"progressDeadlineSeconds": DEADLINE})
    status = _wait_degraded(world, 120)
    assert time.monotonic() - started < DEADLINE / 4
    assert status["rollout"]["reason"] == "FailedMount"
    assert missing in status["rollout"]["message"]
    assert world.condition("Degraded")["reason"] == "FailedMount"


def test_pods_the_api_server_refuses_to_create_are_named_in_status_at_once(world: World) -> None:
    """A PriorityClass that does not exist: the color's ReplicaSet cannot create a single pod. Status says so within
    seconds (it used to say only "0/1 pod(s) of blue ready" until the deadline), and the rollback at the deadline
    names it."""
    world.create(scheduling={"priorityClassName": "no-such-class"}, rollout={"progressDeadlineSeconds": 30})
    progressing = wait_for("the refusal in status", lambda: "no PriorityClass" in (
        message := world.condition("Progressing").get("message", "")) and message, 30)
    assert "the API server refuses to create its pods" in progressing
    assert "no PriorityClass with name no-such-class was found" in progressing
    assert world.condition("Ready")["status"] == "False"
    status = _wait_degraded(world, 90)
    assert status["rollout"]["reason"] == "ProgressDeadlineExceeded"
    assert "no PriorityClass with name no-such-class was found" in status["rollout"]["message"]


def test_a_secret_not_there_yet_keeps_the_rollout_waiting_until_it_appears(world: World, cluster, redis_url) -> None:
    """A GitOps sync may apply a deployment before the Secret with its Redis URL: the kubelet keeps the container
    waiting (CreateContainerConfigError: the Secret is not found) and starts it once the Secret is there. The
    rollout waits too, within its deadline, saying what for, instead of rolling back at once."""
    world.create(redis={"secretRef": {"name": "redis-auth"}}, rollout={
        "progressDeadlineSeconds": DEADLINE, "analysis": {"requests": 2, "windowSeconds": 3, "maxLatencyMs": 20000}})
    waiting = wait_for("the rollout to name the missing Secret", lambda: (
        'secret "redis-auth" not found' in ((status := world.status()).get("rollout") or {}).get("message", "")
        and status), 120)
    assert waiting["rollout"]["phase"] == "Starting", waiting["rollout"]
    time.sleep(8)  # several reconciles of the waiting pod: an early rollback would have happened by now
    status = world.status()
    assert status["rollout"]["phase"] == "Starting" and not status.get("failedRevision"), status["rollout"]
    assert world.condition("Degraded")["status"] == "False"
    assert "CreateContainerConfigError" in status["rollout"]["message"]

    # pods reach the test's redis-server through their network's gateway
    url = f"redis://{cluster.network.gateway}:{urlsplit(redis_url).port}/0"
    world.core.create_namespaced_secret(world.namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="redis-auth"), data={"url": base64.b64encode(url.encode()).decode()}))
    status = world.wait_phase("Completed", timeout=240)
    assert status["activeRevision"] == waiting["rollout"]["revision"] and not status.get("failedRevision")
