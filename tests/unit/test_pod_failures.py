"""Pods known to be hopeless end the Starting phase at once, with the reason a person recognizes (pure)."""

from __future__ import annotations

from typing import Any

from deepseek_operator.rollout import format_time, next_step, observe_color
from test_rollout import NEW, NOW, condition, observed, stable_status

DEPLOYMENT = {"spec": {"replicas": 1, "template": {"metadata": {"labels": {"deepseek.ai/revision": NEW}}}}}


def _pod(*, waiting: dict[str, Any] | None = None, restarts: int = 0, init: bool = False) -> dict[str, Any]:
    statuses = [{"name": "fetch-model" if init else "server", "restartCount": restarts,
                 "state": {"waiting": waiting} if waiting else {"running": {}},
                 "lastState": {"terminated": {"exitCode": 2, "message": "no model at /models/x"}} if restarts else {}}]
    return {"metadata": {"name": "chat-green-1", "uid": "pod-uid", "labels": {"deepseek.ai/revision": NEW}},
            "status": {"phase": "Pending",
                       "conditions": [{"type": "Ready", "status": "False"}],
                       "initContainerStatuses" if init else "containerStatuses": statuses}}


def _starting(pods: list[dict[str, Any]], events: list[dict[str, Any]] | None = None) -> Any:
    green = observe_color(DEPLOYMENT, pods, gpu_resource="nvidia.com/gpu", gpus_per_pod=1, events=events or [])
    # Ten seconds into a 600 s deadline.
    return next_step(observed(stable_status(phase="Starting", deadline=format_time(NOW + 590)), green=green))


def _assert_rolled_back_early(decision: Any, reason: str, detail: str) -> None:
    rollout = decision.status["rollout"]
    assert rollout["phase"] == "RollingBack", rollout
    assert rollout["reason"] == reason
    assert detail in rollout["message"]
    assert condition(decision, "Degraded").reason == reason


def test_a_crash_looping_server_rolls_back_with_reason_crash_loop_back_off() -> None:
    pod = _pod(waiting={"reason": "CrashLoopBackOff", "message": "back-off 20s"}, restarts=2)
    _assert_rolled_back_early(_starting([pod]), "CrashLoopBackOff", "no model at /models/x")


def test_a_crash_looping_model_fetch_rolls_back_too() -> None:
    pod = _pod(waiting={"reason": "CrashLoopBackOff"}, restarts=3, init=True)
    _assert_rolled_back_early(_starting([pod]), "CrashLoopBackOff", "fetch-model")


def test_one_crash_is_not_yet_a_crash_loop() -> None:
    pod = _pod(waiting={"reason": "CrashLoopBackOff"}, restarts=1)
    assert _starting([pod]).status["rollout"]["phase"] == "Starting"


def test_an_image_that_cannot_be_pulled_rolls_back_with_the_pull_reason() -> None:
    for reason in ("ImagePullBackOff", "ErrImagePull"):
        pod = _pod(waiting={"reason": reason, "message": 'pull access denied for "nosuch/image"'})
        _assert_rolled_back_early(_starting([pod]), reason, "nosuch/image")


def test_a_missing_host_path_rolls_back_with_failed_mount_from_the_kubelets_event() -> None:
    pod = _pod(waiting={"reason": "ContainerCreating"})
    event = {"reason": "FailedMount", "type": "Warning", "involvedObject": {"kind": "Pod", "uid": "pod-uid"},
             "message": 'MountVolume.SetUp failed for volume "model" : hostPath type check failed: '
                        "/models/missing is not a directory"}
    other = {**event, "involvedObject": {"kind": "Pod", "uid": "someone-else"}}
    assert _starting([pod], [other]).status["rollout"]["phase"] == "Starting"
    _assert_rolled_back_early(_starting([pod], [event]), "FailedMount", "/models/missing is not a directory")


def test_a_missing_host_path_rolls_back_with_failed_mount_from_the_pod_status() -> None:
    # devcluster's node agent reports the mount failure in the waiting message instead of an Event.
    pod = _pod(waiting={"reason": "ContainerCreating",
                        "message": "MountVolume.SetUp failed: hostPath type check failed: /models/missing is not a "
                                   "directory"})
    _assert_rolled_back_early(_starting([pod]), "FailedMount", "/models/missing")


def test_a_mount_still_being_set_up_keeps_the_deadline() -> None:
    # A Secret or a claim that is not there yet may still appear: only the deadline ends that wait.
    pod = _pod(waiting={"reason": "ContainerCreating"})
    event = {"reason": "FailedMount", "type": "Warning", "involvedObject": {"kind": "Pod", "uid": "pod-uid"},
             "message": 'MountVolume.SetUp failed for volume "auth" : configmap "chat-auth" not found'}
    assert _starting([pod], [event]).status["rollout"]["phase"] == "Starting"


def test_a_crash_loop_is_explained_by_the_last_line_of_the_containers_log() -> None:
    tail = ("p demo/tiny-auth watch failed: Response ended prematurely\nINFO:     Finished server process [7]\n"
            "deepseek-server: the model could not be loaded: FileNotFoundError: no config.json in /models/x\n\n")
    pod = _pod(waiting={"reason": "CrashLoopBackOff"}, restarts=2)
    pod["status"]["containerStatuses"][0]["lastState"]["terminated"] = {"exitCode": 1, "message": tail}
    message = _starting([pod]).status["rollout"]["message"]
    assert message.endswith("(exit code 1: deepseek-server: the model could not be loaded: FileNotFoundError: "
                            "no config.json in /models/x)"), message
    assert "\n" not in message and "Finished server process" not in message


def test_a_secret_or_config_map_that_is_not_there_yet_keeps_the_deadline_and_is_named() -> None:
    """The kubelet retries a container whose env names a Secret or ConfigMap (or a key in one) that is missing, and
    starts it once it appears (a GitOps sync may apply the deployment before the Redis or token Secret): the rollout
    waits, saying what for, instead of rolling back at once."""
    for message in ('secret "redis-auth" not found', "couldn't find key url in Secret team-a/redis-auth",
                    'configmap "settings" not found', "couldn't find key k in configmap team-a/settings"):
        for init in (False, True):
            pod = _pod(waiting={"reason": "CreateContainerConfigError", "message": message}, init=init)
            decision = _starting([pod])
            assert decision.status["rollout"]["phase"] == "Starting", (message, init)
            assert message in decision.status["rollout"]["message"]


def test_a_container_configuration_that_cannot_be_built_rolls_back_at_once() -> None:
    pod = _pod(waiting={"reason": "CreateContainerConfigError",
                        "message": "container has runAsNonRoot and image will run as root"})
    _assert_rolled_back_early(_starting([pod]), "CreateContainerConfigError", "runAsNonRoot")
    pod = _pod(waiting={"reason": "InvalidImageName", "message": 'couldn\'t parse image name "Bad:Name"'})
    _assert_rolled_back_early(_starting([pod]), "InvalidImageName", "Bad:Name")
