"""The blue-green state machine, one test per transition (pure: no cluster, no clock)."""

from __future__ import annotations

from typing import Any

from deepseek_operator.capacity import CapacityShortage
from deepseek_operator.rollout import (
    ColorObservation,
    LiveTraffic,
    Observed,
    PointPreview,
    RolloutSettings,
    ScaleColor,
    SwitchTraffic,
    Verify,
    format_time,
    judging_settings,
    next_step,
    observe_color,
    settings_changes,
)

NOW = 1_800_000_000.0
OLD, NEW = "aaaaaaaaaa", "bbbbbbbbbb"
SETTINGS = RolloutSettings(replicas=2, preview_replicas=1, progress_deadline=600, window=60, scale_down_delay=120,
                           history_limit=3, max_error_rate=0.05, progressing_interval=1.0, stable_interval=30.0)
SHORTAGE = CapacityShortage(1, 1, "nvidia.com/gpu", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")


def ready(color: str, revision: str, count: int, replicas: int | None = None, **extra: Any) -> ColorObservation:
    return ColorObservation(exists=True, revision=revision, replicas=count if replicas is None else replicas,
                            ready_pods=tuple(f"{color}-{revision[:3]}-{i}" for i in range(count)),
                            pods=count if replicas is None else max(count, replicas), **extra)


def stable_status(**rollout: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"activeColor": "blue", "activeRevision": OLD, "history": []}
    if rollout:
        status["rollout"] = {"revision": NEW, "color": "green", "startedAt": format_time(NOW - 10),
                             "deadline": format_time(NOW + 590), **rollout}
    return status


def observed(status: dict[str, Any], *, desired: str = NEW, green: ColorObservation | None = None,
             blue: ColorObservation | None = None, service: tuple[str, str] | None = ("blue", OLD),
             settings: RolloutSettings = SETTINGS, now: float = NOW, annotations: dict[str, str] | None = None,
             live: LiveTraffic | None = None) -> Observed:
    return Observed(
        now=now, desired_revision=desired, settings=settings, status=status,
        colors={"blue": blue if blue is not None else ready("blue", OLD, 2),
                "green": green if green is not None else ColorObservation()},
        annotations=annotations or {}, service_target=service, live=live,
        summary={"model": "tiny", "image": "deepseek-server:dev", "precision": "fp32"},
    )


def condition(decision: Any, type_: str) -> Any:
    return next(c for c in decision.conditions if c.type == type_)


# ------------------------------------------------------------------------------------------------ steady state
def test_first_revision_starts_provisioning_in_blue() -> None:
    decision = next_step(observed({}, desired=OLD, blue=ColorObservation(), service=None))
    rollout = decision.status["rollout"]
    assert (rollout["phase"], rollout["color"], rollout["revision"]) == ("Provisioning", "blue", OLD)
    assert [e.reason for e in decision.events] == ["RolloutStarted"]
    assert decision.again
    assert condition(decision, "Ready").status is False


def test_spec_change_starts_rollout_into_idle_color() -> None:
    decision = next_step(observed(stable_status()))
    assert decision.status["rollout"]["phase"] == "Provisioning"
    assert decision.status["rollout"]["color"] == "green"
    assert decision.status["activeColor"] == "blue"
    assert decision.status["previewRevision"] == NEW


def test_steady_state_scales_active_color_without_rollout() -> None:
    decision = next_step(observed(stable_status(), desired=OLD, blue=ready("blue", OLD, 2, replicas=3)))
    assert decision.scale == [ScaleColor("blue", 2, None)]
    assert decision.status.get("rollout") is None
    assert condition(decision, "Ready").status is True
    assert decision.requeue_after == SETTINGS.stable_interval


def test_steady_state_restores_active_service_selector() -> None:
    decision = next_step(observed(stable_status(), desired=OLD, service=("green", NEW)))
    assert decision.switch == SwitchTraffic("blue", OLD)


def test_failed_revision_is_not_retried() -> None:
    status = {**stable_status(), "failedRevision": NEW,
              "rollout": {"phase": "Degraded", "revision": NEW, "color": "green", "reason": "VerificationFailed"}}
    decision = next_step(observed(status))
    assert decision.status["rollout"]["phase"] == "Degraded"
    assert decision.scale == [] and decision.events == []
    assert condition(decision, "Degraded").status is True
    assert condition(decision, "Degraded").reason == "VerificationFailed"


def test_retry_annotation_restarts_the_failed_revision_once() -> None:
    status = {**stable_status(), "failedRevision": NEW,
              "rollout": {"phase": "Degraded", "revision": NEW, "color": "green"}}
    decision = next_step(observed(status, annotations={"deepseek.ai/retry": NEW}))
    assert decision.status["rollout"]["phase"] == "Provisioning"
    assert decision.status["retriedRevision"] == NEW
    # failing again with the annotation still there: no second retry
    again = {**status, "retriedRevision": NEW}
    assert next_step(observed(again, annotations={"deepseek.ai/retry": NEW})).status["rollout"]["phase"] == "Degraded"


def test_removing_retry_annotation_forgets_the_retry() -> None:
    status = {**stable_status(), "failedRevision": NEW, "retriedRevision": NEW,
              "rollout": {"phase": "Degraded", "revision": NEW, "color": "green"}}
    assert next_step(observed(status)).status["retriedRevision"] is None


def settings_of(**rollout: Any) -> RolloutSettings:
    return RolloutSettings.from_spec({"replicas": 2, "rollout": rollout}, progressing_interval=1.0,
                                     stable_interval=30.0)


def test_a_failed_revision_is_tried_once_more_under_other_rollout_settings() -> None:
    """A revision rolled back for a deadline or an analysis that was too tight is tried again, once, when the rollout
    settings it failed under change (a user raising progressDeadlineSeconds for a slow load, or maxLatencyMs); the
    Degraded message says so. Settings that judge nothing (autoPromote, scaleDownDelaySeconds), or replicas, do not
    retry it; a revision that failed again under the new settings waits again."""
    tight = settings_of(progressDeadlineSeconds=60, analysis={"maxLatencyMs": 1})
    # the rollout records the settings it runs under, and the rollback the ones it failed under
    started = next_step(observed(stable_status(), settings=tight))
    assert started.status["rollout"]["settings"] == judging_settings({"rollout": {
        "progressDeadlineSeconds": 60, "analysis": {"maxLatencyMs": 1}}})
    rolling_back = {**stable_status(phase="RollingBack", reason="VerificationFailed", message="p95 too high"),
                    "rollout": {**started.status["rollout"], "phase": "RollingBack", "reason": "VerificationFailed"}}
    degraded = next_step(observed(rolling_back, settings=tight, green=ready("green", NEW, 0, replicas=1)))
    assert degraded.status["rollout"]["phase"] == "Degraded"
    assert degraded.status["failedSettings"] == started.status["rollout"]["settings"]
    status = degraded.status
    waiting = next_step(observed(status, settings=tight, green=ready("green", NEW, 0, replicas=0)))
    assert waiting.status["rollout"]["phase"] == "Degraded" and waiting.events == []
    assert "its rollout settings (progressDeadlineSeconds, strategy, previewReplicas, analysis) change" in \
        condition(waiting, "Degraded").message
    for unjudged in (settings_of(progressDeadlineSeconds=60, analysis={"maxLatencyMs": 1}, autoPromote=False,
                                 scaleDownDelaySeconds=5, revisionHistoryLimit=9),
                     RolloutSettings.from_spec({"replicas": 5, "rollout": {"progressDeadlineSeconds": 60,
                                                                           "analysis": {"maxLatencyMs": 1}}},
                                               progressing_interval=1.0, stable_interval=30.0)):
        assert next_step(observed(status, settings=unjudged)).status["rollout"]["phase"] == "Degraded"

    looser = settings_of(progressDeadlineSeconds=600, analysis={"maxLatencyMs": 30000})
    retried = next_step(observed(status, settings=looser, green=ready("green", NEW, 0, replicas=0)))
    assert retried.status["rollout"]["phase"] == "Provisioning"
    assert retried.status["rollout"]["settings"] == looser.judging
    assert [e.reason for e in retried.events] == ["RetryingRevision", "RolloutStarted"]
    assert retried.events[0].message == (
        f"revision {NEW} failed under other rollout settings; trying it once under these: "
        "analysis.maxLatencyMs 1 -> 30000, progressDeadlineSeconds 60 -> 600")
    # its pods start from zero with the template built now (the startup probe sized to the new deadline), though
    # the color already had this revision
    provisioning = next_step(observed({**status, **retried.status}, settings=looser,
                                      green=ready("green", NEW, 0, replicas=0)))
    assert provisioning.scale == [ScaleColor("green", 1, NEW)]
    # failed again under the new settings: it waits again
    again = {**status, "failedSettings": looser.judging}
    assert next_step(observed(again, settings=looser)).status["rollout"]["phase"] == "Degraded"
    # a failure recorded before settings were (an older operator): it waits as it did
    older = {key: value for key, value in status.items() if key != "failedSettings"}
    assert next_step(observed(older, settings=looser)).status["rollout"]["phase"] == "Degraded"


def test_a_revision_failed_under_settings_changed_while_it_ran_is_not_retried_for_them() -> None:
    """The analysis and deadlines are read from the spec when each phase is judged, so a change made during the
    rollout was applied to it: the failure is recorded under the changed values (how it started, strategy and
    previewReplicas, as when it started) and waits, instead of a RetryingRevision that would run the same rollout
    again under the same settings."""
    tight = settings_of(progressDeadlineSeconds=60, analysis={"maxLatencyMs": 1})
    started = next_step(observed(stable_status(), settings=tight))
    changed = settings_of(progressDeadlineSeconds=60, previewReplicas=2, analysis={"maxLatencyMs": 5})
    rolling_back = {**stable_status(), "rollout": {**started.status["rollout"], "phase": "RollingBack",
                                                   "reason": "VerificationFailed", "message": "p95 too high"}}
    degraded = next_step(observed(rolling_back, settings=changed, green=ready("green", NEW, 0, replicas=1)))
    assert degraded.status["failedSettings"] == {**changed.judging, "previewReplicas": 1}
    waiting = next_step(observed({**rolling_back, **degraded.status}, settings=settings_of(
        progressDeadlineSeconds=60, previewReplicas=1, analysis={"maxLatencyMs": 5})))
    assert waiting.status["rollout"]["phase"] == "Degraded" and waiting.events == []


def test_strategy_and_preview_replicas_changed_during_a_rollout_apply_to_the_next_one() -> None:
    """How a rollout starts its new color is fixed when it starts (status.rollout.settings): a previewReplicas or
    strategy change made meanwhile neither scales up the color being verified nor stops the serving color, and a
    failure then is recorded under the values the rollout really ran with (so the change retries it once)."""
    bluegreen = settings_of(previewReplicas=1)
    started = next_step(observed(stable_status(), settings=bluegreen))
    assert started.status["rollout"]["settings"]["previewReplicas"] == 1
    provisioning = {**stable_status(), "rollout": started.status["rollout"]}
    wider = settings_of(previewReplicas=2)
    assert next_step(observed(provisioning, settings=wider)).scale == [ScaleColor("green", 1, NEW)]
    starting = {**stable_status(), "rollout": {**started.status["rollout"], "phase": "Starting"}}
    decision = next_step(observed(starting, settings=wider, green=ready("green", NEW, 0, replicas=1)))
    assert decision.scale == [], decision.scale  # green keeps its one pod
    recreate = settings_of(strategy="Recreate", previewReplicas=1)
    decision = next_step(observed(provisioning, settings=recreate))
    assert ScaleColor("blue", 0) not in decision.scale and decision.scale == [ScaleColor("green", 1, NEW)]
    # failed: recorded as it ran (previewReplicas 1), so the spec's 2 is a change that retries it once
    rolling_back = {**starting, "rollout": {**starting["rollout"], "phase": "RollingBack", "reason": "Timeout"}}
    degraded = next_step(observed(rolling_back, settings=wider, green=ready("green", NEW, 0, replicas=1)))
    assert degraded.status["failedSettings"]["previewReplicas"] == 1
    retried = next_step(observed({**rolling_back, **degraded.status}, settings=wider))
    assert [e.reason for e in retried.events][:1] == ["RetryingRevision"], retried.events


def test_judging_settings_resolve_defaults_and_changes_are_named() -> None:
    assert judging_settings({}) == judging_settings({"rollout": {
        "strategy": "BlueGreen", "previewReplicas": 1, "progressDeadlineSeconds": 1800, "autoPromote": False,
        "analysis": {"smokePrompt": "Say hello in one short sentence.", "requests": 5, "maxErrorRate": 0.05,
                     "maxLatencyMs": 30000, "windowSeconds": 300}}})
    before = judging_settings({})
    after = judging_settings({"rollout": {"strategy": "Recreate", "analysis": {"smokePrompt": "secret plan"}}})
    assert settings_changes(before, after) == ["analysis.smokePrompt changed", "strategy BlueGreen -> Recreate"]
    assert settings_changes(before, before) == []


def test_a_color_scaled_up_from_zero_gets_its_template_rebuilt_and_running_pods_are_left_alone() -> None:
    provisioning = stable_status(phase="Provisioning")
    assert next_step(observed(provisioning, green=ready("green", NEW, 0, replicas=0))).scale == [
        ScaleColor("green", 1, NEW)]
    # a color already running the revision is only scaled: its pods are not replaced
    assert next_step(observed(stable_status(phase="Promoting", verifiedPods=["green-bbb-0"]),
                              green=ready("green", NEW, 1))).scale[0] == ScaleColor("green", 2, None)


def test_spec_reverted_to_warm_color_switches_back_at_once() -> None:
    # green runs NEW (active), blue still runs OLD warm; spec goes back to OLD
    status = {"activeColor": "green", "activeRevision": NEW, "history": [],
              "rollout": {"phase": "Completed", "revision": NEW, "color": "green",
                          "scaleDownAt": format_time(NOW + 100)}}
    first = next_step(observed(status, desired=OLD, green=ready("green", NEW, 2), service=("green", NEW)))
    assert first.status["rollout"]["phase"] == "Promoting"
    assert first.status["rollout"]["color"] == "blue"
    second = next_step(observed({**status, **first.status}, desired=OLD, green=ready("green", NEW, 2),
                                service=("green", NEW)))
    assert second.switch == SwitchTraffic("blue", OLD)
    assert second.verify is None
    assert second.status["activeColor"] == "blue"


def test_old_color_scaled_down_after_delay() -> None:
    status = stable_status()
    status["activeColor"], status["activeRevision"] = "green", NEW
    status["rollout"] = {"phase": "Completed", "revision": NEW, "color": "green",
                         "scaleDownAt": format_time(NOW + 50)}
    kwargs = {"green": ready("green", NEW, 2), "blue": ready("blue", OLD, 2), "service": ("green", NEW)}
    early = next_step(observed(status, **kwargs))
    assert early.scale == [] and 1.0 <= early.requeue_after <= 50
    late = next_step(observed(status, now=NOW + 51, **kwargs))
    assert late.scale == [ScaleColor("blue", 0, None)]
    assert [e.reason for e in late.events] == ["ScaledDown"]


def test_degraded_becomes_completed_when_spec_returns_to_active() -> None:
    status = {**stable_status(), "failedRevision": NEW,
              "rollout": {"phase": "Degraded", "revision": NEW, "color": "green"}}
    decision = next_step(observed(status, desired=OLD))
    assert decision.status["rollout"]["phase"] == "Completed"
    assert condition(decision, "Degraded").status is False


# ------------------------------------------------------------------------------------------------ phases
def test_provisioning_builds_idle_color_with_preview_replicas() -> None:
    decision = next_step(observed(stable_status(phase="Provisioning")))
    assert decision.scale == [ScaleColor("green", 1, NEW)]
    assert decision.preview == PointPreview("green", NEW)
    assert decision.status["rollout"]["phase"] == "Starting"


def test_first_rollout_provisions_all_replicas() -> None:
    status = {"rollout": {"phase": "Provisioning", "revision": OLD, "color": "blue",
                          "deadline": format_time(NOW + 100)}}
    decision = next_step(observed(status, desired=OLD, blue=ColorObservation(), service=None))
    assert decision.scale == [ScaleColor("blue", 2, OLD)]


def test_recreate_stops_active_color_first() -> None:
    settings = RolloutSettings(**{**SETTINGS.__dict__, "strategy": "Recreate"})
    decision = next_step(observed(stable_status(phase="Provisioning"), settings=settings))
    assert ScaleColor("blue", 0, None) in decision.scale
    assert decision.status["rollout"]["phase"] == "Provisioning"
    stopped = ColorObservation(exists=True, revision=OLD, replicas=0)
    decision = next_step(observed(stable_status(phase="Provisioning"), settings=settings, blue=stopped))
    assert decision.scale == [ScaleColor("green", 2, NEW)]
    assert decision.status["rollout"]["phase"] == "Starting"


def test_starting_waits_for_preview_pods() -> None:
    decision = next_step(observed(stable_status(phase="Starting"), green=ready("green", NEW, 0, replicas=1)))
    assert decision.status["rollout"]["phase"] == "Starting"
    assert decision.requeue_after == SETTINGS.progressing_interval
    assert condition(decision, "Progressing").status is True


def test_starting_to_verifying_when_preview_ready() -> None:
    decision = next_step(observed(stable_status(phase="Starting"), green=ready("green", NEW, 1)))
    assert decision.status["rollout"]["phase"] == "Verifying"


def test_starting_reports_gpu_shortage_and_keeps_serving() -> None:
    green = ready("green", NEW, 0, replicas=1, shortage=SHORTAGE)
    decision = next_step(observed(stable_status(phase="Starting"), green=green))
    capacity = condition(decision, "CapacityAvailable")
    assert capacity.status is False and capacity.reason == "InsufficientGPU"
    assert "1 more needed" in capacity.message and "Insufficient nvidia.com/gpu" in capacity.message
    assert condition(decision, "Ready").status is True
    assert decision.switch is None and not any(s.color == "blue" for s in decision.scale)


def test_starting_deadline_rolls_back() -> None:
    green = ready("green", NEW, 0, replicas=1, shortage=SHORTAGE)
    decision = next_step(observed(stable_status(phase="Starting"), green=green, now=NOW + 600))
    assert decision.status["rollout"]["phase"] == "RollingBack"
    assert decision.status["rollout"]["reason"] == "ProgressDeadlineExceeded"
    assert "Insufficient" in decision.status["rollout"]["message"]
    stuck = ready("green", NEW, 0, replicas=1, waiting="pod g: ContainerCreating MountVolume.SetUp failed")
    decision = next_step(observed(stable_status(phase="Starting"), green=stuck, now=NOW + 600))
    assert "MountVolume.SetUp failed" in decision.status["rollout"]["message"]


def test_starting_crash_loop_rolls_back_early() -> None:
    green = ready("green", NEW, 0, replicas=1, failure="pod x restarted 3 times (exit code 1: no such model)")
    decision = next_step(observed(stable_status(phase="Starting"), green=green))
    assert decision.status["rollout"]["phase"] == "RollingBack"
    assert decision.status["rollout"]["reason"] == "ServerFailing"


def test_verifying_asks_for_inference_check() -> None:
    decision = next_step(observed(stable_status(phase="Verifying"), green=ready("green", NEW, 1)))
    assert decision.verify == Verify("green", NEW, "Verifying", 1)
    assert decision.status["rollout"]["phase"] == "Verifying"


def test_verifying_gets_a_deadline_of_its_own() -> None:
    decision = next_step(observed(stable_status(phase="Starting", deadline=format_time(NOW + 1)),
                                  green=ready("green", NEW, 1)))
    assert decision.status["rollout"]["phase"] == "Verifying"
    assert decision.status["rollout"]["deadline"] == format_time(NOW + SETTINGS.progress_deadline)


def test_verifying_that_never_gets_to_run_rolls_back_at_its_deadline() -> None:
    """The inference check waits while the ready pods are not all in the preview Service's endpoints (or no signing
    key is published): past the phase's deadline that is a rollback, not a rollout left in Verifying for good."""
    status = stable_status(phase="Verifying", deadline=format_time(NOW - 1))
    decision = next_step(observed(status, green=ready("green", NEW, 1)))
    assert decision.verify is None
    assert decision.status["rollout"]["phase"] == "RollingBack"
    assert decision.status["rollout"]["reason"] == "ProgressDeadlineExceeded"
    assert "could not be verified within" in decision.status["rollout"]["message"]
    # a result that came in time is judged, whatever the clock says now
    status = stable_status(phase="Verifying", deadline=format_time(NOW - 1),
                           analysis={"stage": "Verifying", "passed": True, "message": "5/5"})
    assert next_step(observed(status, green=ready("green", NEW, 1))).status["rollout"]["phase"] == "Promoting"


def test_verifying_back_to_starting_when_pod_lost() -> None:
    decision = next_step(observed(stable_status(phase="Verifying"), green=ready("green", NEW, 0, replicas=1)))
    assert decision.status["rollout"]["phase"] == "Starting"
    assert decision.verify is None


def test_verified_with_auto_promote_goes_promoting() -> None:
    status = stable_status(phase="Verifying", analysis={"stage": "Verifying", "passed": True, "message": "5/5"})
    decision = next_step(observed(status, green=ready("green", NEW, 1)))
    assert decision.status["rollout"]["phase"] == "Promoting"
    assert [e.reason for e in decision.events] == ["Verified"]


def test_verified_without_auto_promote_awaits_promotion() -> None:
    settings = RolloutSettings(**{**SETTINGS.__dict__, "auto_promote": False})
    status = stable_status(phase="Verifying", analysis={"stage": "Verifying", "passed": True, "message": "ok"})
    decision = next_step(observed(status, green=ready("green", NEW, 1), settings=settings))
    assert decision.status["rollout"]["phase"] == "AwaitingPromotion"
    assert "deepseek.ai/promote=" + NEW in decision.status["rollout"]["message"]


def test_first_revision_is_promoted_without_waiting_for_annotation() -> None:
    settings = RolloutSettings(**{**SETTINGS.__dict__, "auto_promote": False})
    status = {"rollout": {"phase": "Verifying", "revision": OLD, "color": "blue",
                          "analysis": {"stage": "Verifying", "passed": True}}}
    decision = next_step(observed(status, desired=OLD, blue=ready("blue", OLD, 2), service=None, settings=settings))
    assert decision.status["rollout"]["phase"] == "Promoting"


def test_verification_failure_rolls_back() -> None:
    status = stable_status(phase="Verifying", analysis={"stage": "Verifying", "passed": False,
                                                        "message": "error rate 100% (5/5)"})
    decision = next_step(observed(status, green=ready("green", NEW, 1)))
    assert decision.status["rollout"]["phase"] == "RollingBack"
    assert decision.status["rollout"]["reason"] == "VerificationFailed"


def test_promote_annotation_for_this_revision_promotes() -> None:
    settings = RolloutSettings(**{**SETTINGS.__dict__, "auto_promote": False})
    status = stable_status(phase="AwaitingPromotion")
    assert next_step(observed(status, green=ready("green", NEW, 1), settings=settings,
                              annotations={"deepseek.ai/promote": OLD})).status["rollout"]["phase"] == (
        "AwaitingPromotion")
    decision = next_step(observed(status, green=ready("green", NEW, 1), settings=settings,
                                  annotations={"deepseek.ai/promote": NEW}))
    assert decision.status["rollout"]["phase"] == "Promoting"
    assert decision.status["rollout"]["message"] == "promotion asked for by deepseek.ai/promote"


def test_auto_promote_turned_on_while_awaiting_promotion_promotes() -> None:
    """The revision has passed verification: turning autoPromote on switches it as it would have switched had it
    been on all along (it stayed in AwaitingPromotion until someone also set the annotation)."""
    decision = next_step(observed(stable_status(phase="AwaitingPromotion"), green=ready("green", NEW, 1)))
    assert decision.status["rollout"]["phase"] == "Promoting"
    assert "autoPromote was turned on" in decision.status["rollout"]["message"]
    assert decision.again


def test_abort_annotation_rolls_back() -> None:
    decision = next_step(observed(stable_status(phase="AwaitingPromotion"), green=ready("green", NEW, 1),
                                  annotations={"deepseek.ai/abort": NEW}))
    assert decision.status["rollout"]["phase"] == "RollingBack"
    assert decision.status["rollout"]["reason"] == "Aborted"


def test_abort_after_the_switch_sends_traffic_back_to_the_warm_color() -> None:
    """`deepseek.ai/abort=<revision>` works in any phase before Completed: in PostVerifying, after traffic moved, it
    rolls back and the stable color gets the traffic again; once Completed it does nothing."""
    switched = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 10)),
                "activeColor": "green", "activeRevision": NEW}
    kwargs = {"green": ready("green", NEW, 2), "blue": ready("blue", OLD, 2), "service": ("green", NEW),
              "annotations": {"deepseek.ai/abort": NEW}}
    aborting = next_step(observed(switched, live=LiveTraffic(100, 0), **kwargs))
    assert (aborting.status["rollout"]["phase"], aborting.status["rollout"]["reason"]) == ("RollingBack", "Aborted")
    back = next_step(observed({**switched, **aborting.status}, **kwargs))
    assert back.switch == SwitchTraffic("blue", OLD)
    assert back.status["activeColor"] == "blue" and back.status["activeRevision"] == OLD
    assert back.status["failedRevision"] == NEW and back.status["history"][0]["result"] == "Aborted"
    done = {**switched, "rollout": {**switched["rollout"], "phase": "Completed"}}
    assert next_step(observed(done, desired=NEW, **kwargs)).status["rollout"]["phase"] == "Completed"


def test_promoting_scales_to_full_and_waits() -> None:
    status = stable_status(phase="Promoting", verifiedPods=["green-bbb-0"])
    decision = next_step(observed(status, green=ready("green", NEW, 1, replicas=1)))
    assert decision.scale == [ScaleColor("green", 2, None)]
    assert decision.switch is None
    assert decision.status["activeColor"] == "blue"


def test_promoting_verifies_pods_not_yet_verified_before_switch() -> None:
    status = stable_status(phase="Promoting", verifiedPods=["green-bbb-0"])
    decision = next_step(observed(status, green=ready("green", NEW, 2)))
    assert decision.verify == Verify("green", NEW, "Promoting", 1, only=("green-bbb-1",))
    assert decision.switch is None


def test_promoting_switches_only_when_all_ready() -> None:
    status = stable_status(phase="Promoting", verifiedPods=["green-bbb-0", "green-bbb-1"])
    decision = next_step(observed(status, green=ready("green", NEW, 2)))
    assert decision.switch == SwitchTraffic("green", NEW)
    assert decision.status["activeColor"] == "green" and decision.status["activeRevision"] == NEW
    assert decision.status["rollout"]["phase"] == "PostVerifying"
    assert [e.reason for e in decision.events] == ["Promoted"]


def test_promoting_hands_over_one_gpu_replica_at_a_time() -> None:
    status = stable_status(phase="Promoting", verifiedPods=["green-bbb-0"])
    green = ready("green", NEW, 1, replicas=2, shortage=SHORTAGE)
    decision = next_step(observed(status, green=green))
    assert ScaleColor("blue", 1, None) in decision.scale
    assert decision.switch is None
    assert condition(decision, "CapacityAvailable").status is False
    # a step still settling (blue has a terminating pod) or the last serving replica: no further step
    settling = next_step(observed(status, green=green, blue=ready("blue", OLD, 1, replicas=1).__class__(
        exists=True, revision=OLD, replicas=1, ready_pods=("blue-aaa-0",), pods=2)))
    assert not any(s.color == "blue" for s in settling.scale)
    last = next_step(observed(status, green=green, blue=ready("blue", OLD, 1)))
    assert not any(s.color == "blue" for s in last.scale)


def test_promoting_deadline_rolls_back() -> None:
    status = stable_status(phase="Promoting", verifiedPods=["green-bbb-0"])
    decision = next_step(observed(status, green=ready("green", NEW, 1, replicas=2), now=NOW + 600))
    assert decision.status["rollout"]["phase"] == "RollingBack"


def test_post_verifying_waits_for_the_window() -> None:
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 10)),
              "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), service=("green", NEW),
                                  live=LiveTraffic(100, 1)))
    assert decision.status["rollout"]["phase"] == "PostVerifying"
    assert decision.status["rollout"]["analysis"]["requests"] == 100
    assert decision.switch is None


def test_post_verifying_completes_after_window() -> None:
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 61)),
              "activeColor": "green", "activeRevision": NEW, "failedRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), service=("green", NEW),
                                  live=LiveTraffic(100, 0)))
    rollout = decision.status["rollout"]
    assert rollout["phase"] == "Completed"
    assert rollout["scaleDownAt"] == format_time(NOW + 120)
    assert decision.status["failedRevision"] is None
    assert decision.status["history"][0]["result"] == "Completed"
    assert decision.status["history"][0]["model"] == "tiny"
    settled = next_step(observed({**status, "failedSettings": judging_settings({})}, green=ready("green", NEW, 2),
                                 service=("green", NEW), live=LiveTraffic(100, 0)))
    assert settled.status["failedRevision"] is None and settled.status["failedSettings"] is None


def test_a_first_rollout_completes_without_an_old_color_to_keep_warm() -> None:
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 61)),
              "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), blue=ColorObservation(),
                                  service=("green", NEW), live=LiveTraffic(100, 0)))
    rollout = decision.status["rollout"]
    assert rollout["phase"] == "Completed" and rollout.get("scaleDownAt") is None
    assert rollout["message"] == f"revision {NEW} serves on green"


def test_post_verifying_error_rate_rolls_back() -> None:
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 10)),
              "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), service=("green", NEW),
                                  live=LiveTraffic(100, 20)))
    assert decision.status["rollout"]["phase"] == "RollingBack"
    assert decision.status["rollout"]["reason"] == "PostVerificationFailed"
    assert "20.0%" in decision.status["rollout"]["message"]


def test_rolling_back_after_switch_returns_traffic_to_ready_stable_color() -> None:
    status = {**stable_status(phase="RollingBack", switchedAt=format_time(NOW - 10), reason="PostVerificationFailed",
                              message="error rate"), "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), service=("green", NEW)))
    assert decision.switch == SwitchTraffic("blue", OLD)
    assert decision.status["activeColor"] == "blue" and decision.status["activeRevision"] == OLD
    assert ScaleColor("green", 0, None) in decision.scale
    assert decision.status["rollout"]["phase"] == "Degraded"
    assert decision.status["failedRevision"] == NEW
    assert [e.reason for e in decision.events] == ["RolledBack"]
    assert decision.status["history"][0]["result"] == "RolledBack"


def test_rolling_back_never_switches_to_unready_color() -> None:
    status = {**stable_status(phase="RollingBack", switchedAt=format_time(NOW - 10), reason="NoReadyReplicas"),
              "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), blue=ready("blue", OLD, 0, replicas=2),
                                  service=("green", NEW)))
    assert decision.switch is None
    assert decision.status["rollout"]["phase"] == "RollingBack"


def test_rolling_back_before_switch_frees_new_color_and_restores_active() -> None:
    status = stable_status(phase="RollingBack", reason="ServerFailing", message="crash")
    decision = next_step(observed(status, green=ready("green", NEW, 0, replicas=1), blue=ready("blue", OLD, 1,
                                                                                               replicas=1)))
    assert ScaleColor("green", 0, None) in decision.scale
    assert ScaleColor("blue", 2, None) in decision.scale
    assert decision.switch is None
    assert decision.status["rollout"]["phase"] == "Degraded"
    assert condition(decision, "Degraded").status is True


def test_aborted_rollout_is_recorded_as_aborted() -> None:
    status = stable_status(phase="RollingBack", reason="Aborted", message="aborted by deepseek.ai/abort")
    decision = next_step(observed(status, green=ready("green", NEW, 1)))
    assert decision.status["history"][0]["result"] == "Aborted"


def test_spec_change_during_rollout_supersedes_it() -> None:
    third = "cccccccccc"
    decision = next_step(observed(stable_status(phase="Starting"), desired=third, green=ready("green", NEW, 0)))
    assert decision.status["rollout"]["phase"] == "Completed"
    assert decision.status["history"][0] == {"revision": NEW, "result": "Aborted", "at": format_time(NOW)}
    assert decision.again
    follow = next_step(observed({**stable_status(), **decision.status}, desired=third))
    assert follow.status["rollout"]["phase"] == "Provisioning"
    assert follow.status["rollout"]["revision"] == third


def test_history_is_bounded() -> None:
    history = [{"revision": f"r{i}", "result": "Completed", "at": format_time(NOW)} for i in range(3)]
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 61)),
              "activeColor": "green", "activeRevision": NEW, "history": history}
    decision = next_step(observed(status, green=ready("green", NEW, 2), service=("green", NEW)))
    assert len(decision.status["history"]) == 3
    assert decision.status["history"][0]["revision"] == NEW


def test_restart_mid_switch_repoints_service_from_status() -> None:
    # status already says traffic is on green, but the Service write was lost when the operator died
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 5)),
              "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), service=("blue", OLD)))
    assert decision.switch == SwitchTraffic("green", NEW)


# ------------------------------------------------------------------------------------------------ observation
def _pod(name: str, revision: str, *, ready_: bool = True, waiting: str | None = None, restarts: int = 0,
         unschedulable: str | None = None) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready_ else "False"}]
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    statuses = []
    if waiting:
        statuses.append({"name": "server", "restartCount": restarts, "state": {"waiting": {"reason": waiting}},
                         "lastState": {"terminated": {"exitCode": 1, "message": "model path does not exist"}}})
    return {"metadata": {"name": name, "labels": {"deepseek.ai/revision": revision}},
            "status": {"conditions": conditions, "containerStatuses": statuses}}


def test_observe_color_counts_ready_pods_of_template_revision_only() -> None:
    deployment = {"spec": {"replicas": 2, "template": {"metadata": {"labels": {"deepseek.ai/revision": NEW}}}}}
    full = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    pods = [_pod("a", NEW), _pod("b", OLD), _pod("c", NEW, ready_=False, unschedulable=full)]
    state = observe_color(deployment, pods, gpu_resource="nvidia.com/gpu", gpus_per_pod=2)
    assert state.ready_pods == ("a",) and state.pods == 3 and state.revision == NEW
    assert state.shortage is not None and state.shortage.gpus_missing == 2


def test_observe_color_reports_crash_loop() -> None:
    deployment = {"spec": {"replicas": 1, "template": {"metadata": {"labels": {"deepseek.ai/revision": NEW}}}}}
    state = observe_color(deployment, [_pod("a", NEW, ready_=False, waiting="CrashLoopBackOff", restarts=2)],
                          gpu_resource="nvidia.com/gpu", gpus_per_pod=1)
    assert state.failure is not None and "model path does not exist" in state.failure
    once = observe_color(deployment, [_pod("a", NEW, ready_=False, waiting="CrashLoopBackOff", restarts=1)],
                         gpu_resource="nvidia.com/gpu", gpus_per_pod=1)
    assert once.failure is None


def test_observe_color_reports_crash_looping_init_container() -> None:
    deployment = {"spec": {"replicas": 1, "template": {"metadata": {"labels": {"deepseek.ai/revision": NEW}}}}}
    pod = _pod("a", NEW, ready_=False)
    pod["status"]["initContainerStatuses"] = [{"name": "fetch-model", "restartCount": 3,
                                               "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]
    state = observe_color(deployment, [pod], gpu_resource="nvidia.com/gpu", gpus_per_pod=1)
    assert state.failure is not None and "restarted 3 times" in state.failure


def test_scaled_to_zero_starts_no_rollout() -> None:
    settings = RolloutSettings(**{**SETTINGS.__dict__, "replicas": 0})
    decision = next_step(observed(stable_status(), settings=settings))
    assert decision.status.get("rollout") is None
    assert decision.scale == [ScaleColor("blue", 0, None)]
    assert condition(decision, "Ready").reason == "ScaledToZero"


REFUSED = 'pods "chat-green-5d8f9-" is forbidden: no PriorityClass with name inference was found'


def _refused_deployment(replicas: int, *, generation: int = 2, observed_generation: int = 2) -> dict[str, Any]:
    return {"metadata": {"generation": generation},
            "spec": {"replicas": replicas, "template": {"metadata": {"labels": {"deepseek.ai/revision": NEW}}}},
            "status": {"observedGeneration": observed_generation, "conditions": [
                {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
                {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": REFUSED}]}}


def test_observe_color_reports_pods_the_api_server_refuses_to_create() -> None:
    state = observe_color(_refused_deployment(2), [], gpu_resource="nvidia.com/gpu", gpus_per_pod=1)
    assert state.waiting == f"the API server refuses to create its pods: {REFUSED}"
    # One pod made, one refused (a quota with room for one): the refusal is what keeps the color from being ready.
    some = observe_color(_refused_deployment(2), [_pod("a", NEW, ready_=False)], gpu_resource="nvidia.com/gpu",
                         gpus_per_pod=1)
    assert some.waiting is not None and "no PriorityClass" in some.waiting
    # Every pod made: whatever the condition says no longer holds them back.
    made = observe_color(_refused_deployment(1), [_pod("a", NEW, ready_=False)], gpu_resource="nvidia.com/gpu",
                         gpus_per_pod=1)
    assert made.waiting == "pod a is not ready yet"
    # The controller has not seen the new template yet: the condition is the previous template's.
    stale = observe_color(_refused_deployment(2, generation=3), [], gpu_resource="nvidia.com/gpu", gpus_per_pod=1)
    assert stale.waiting is None


def test_pods_the_api_server_refuses_are_named_while_starting_and_at_the_deadline() -> None:
    state = observe_color(_refused_deployment(2), [], gpu_resource="nvidia.com/gpu", gpus_per_pod=1)
    green = ColorObservation(**{**state.__dict__, "replicas": 2})
    decision = next_step(observed(stable_status(phase="Starting"), green=green))
    assert decision.status["rollout"]["message"] == f"0/1 pod(s) of green ready; the API server refuses to " \
                                                    f"create its pods: {REFUSED}"
    assert "no PriorityClass with name inference" in condition(decision, "Progressing").message
    assert condition(decision, "Ready").status is True  # blue keeps serving
    late = next_step(observed(stable_status(phase="Starting"), green=green, now=NOW + 600))
    assert late.status["rollout"]["reason"] == "ProgressDeadlineExceeded"
    assert "no PriorityClass with name inference" in late.status["rollout"]["message"]


def test_observe_color_without_deployment() -> None:
    assert not observe_color(None, [], gpu_resource="nvidia.com/gpu", gpus_per_pod=1).exists


def test_spec_edit_during_failing_post_verification_rolls_back_before_the_new_rollout() -> None:
    # green (NEW) took traffic 10 s ago and answers half of it with server errors; then the spec moves on.
    third = "cccccccccc"
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 10)),
              "activeColor": "green", "activeRevision": NEW}
    green = ready("green", NEW, 2)
    first = next_step(observed(status, desired=third, green=green, service=("green", NEW),
                               live=LiveTraffic(40, 20)))
    assert first.status["rollout"]["phase"] == "RollingBack", first.status["rollout"]
    assert first.status["rollout"]["reason"] == "PostVerificationFailed"
    assert "50.0%" in first.status["rollout"]["message"]
    assert all(entry["result"] != "Completed" for entry in first.status["history"])

    second = next_step(observed({**status, **first.status}, desired=third, green=green, service=("green", NEW)))
    assert second.switch == SwitchTraffic("blue", OLD)  # traffic back on the last good color
    assert (second.status["activeColor"], second.status["activeRevision"]) == ("blue", OLD)
    assert ScaleColor("green", 0, None) in second.scale
    assert second.status["failedRevision"] == NEW
    assert second.status["history"][0]["result"] == "RolledBack"

    third_step = next_step(observed({**status, **second.status}, desired=third, green=ready("green", NEW, 0),
                                    service=("blue", OLD)))
    rollout = third_step.status["rollout"]
    assert (rollout["phase"], rollout["color"], rollout["revision"]) == ("Provisioning", "green", third)
    # the stable color is never rebuilt for the new revision
    assert not any(s.color == "blue" and s.revision is not None for s in third_step.scale)


def test_spec_edit_during_healthy_post_verification_completes_the_switch() -> None:
    third = "cccccccccc"
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 10)),
              "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, desired=third, green=ready("green", NEW, 2), service=("green", NEW),
                                  live=LiveTraffic(100, 1)))
    assert decision.status["rollout"]["phase"] == "Completed"
    assert decision.status["history"][0]["result"] == "Completed"


def test_rolling_back_frees_the_failed_colors_gpus_once_the_stable_color_waited_past_its_deadline():
    # Traffic is on green (failed); blue cannot get its GPUs back because green holds them.
    status = {**stable_status(phase="RollingBack", switchedAt=format_time(NOW - 700), reason="PostVerificationFailed",
                              message="error rate", deadline=format_time(NOW - 1)),
              "activeColor": "green", "activeRevision": NEW}
    starved = ready("blue", OLD, 0, replicas=2, shortage=SHORTAGE)
    within = next_step(observed({**status, "rollout": {**status["rollout"], "deadline": format_time(NOW + 60)}},
                                green=ready("green", NEW, 2), blue=starved, service=("green", NEW)))
    assert ScaleColor("green", 0, None) not in within.scale and within.switch is None

    decision = next_step(observed(status, green=ready("green", NEW, 2), blue=starved, service=("green", NEW)))
    assert ScaleColor("green", 0, None) in decision.scale, (
        f"RollingBack past its deadline still waits with {decision.scale}")
    assert decision.switch is None  # never to a color with no ready pod
    assert decision.status["rollout"]["phase"] == "RollingBack"
    assert "GPU" in decision.status["rollout"]["message"] or "gpu" in decision.status["rollout"]["message"]

    freed = next_step(observed({**status, **decision.status}, green=ready("green", NEW, 0, replicas=0),
                               blue=ready("blue", OLD, 2), service=("green", NEW)))
    assert freed.switch == SwitchTraffic("blue", OLD)
    assert freed.status["rollout"]["phase"] == "Degraded" and freed.status["failedRevision"] == NEW


def test_a_rollback_gets_its_own_deadline():
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 10)),
              "activeColor": "green", "activeRevision": NEW}
    decision = next_step(observed(status, green=ready("green", NEW, 2), service=("green", NEW),
                                  live=LiveTraffic(100, 20)))
    assert decision.status["rollout"]["deadline"] == format_time(NOW + SETTINGS.progress_deadline)


def test_a_retried_revision_starts_without_the_abort_and_promotion_of_its_failed_attempt() -> None:
    """`deepseek.ai/abort=R` and `deepseek.ai/promote=R` apply to one attempt of R. When R is tried again (the retry
    annotation, or other rollout settings), the operator removes those left from the failed attempt: left set, the
    abort would roll the new attempt back at once and the promotion would skip its AwaitingPromotion."""
    manual = RolloutSettings(**{**SETTINGS.__dict__, "auto_promote": False})
    status = {**stable_status(), "failedRevision": NEW,
              "rollout": {"phase": "Degraded", "revision": NEW, "color": "green", "reason": "Aborted"}}
    left = {"deepseek.ai/abort": NEW, "deepseek.ai/promote": NEW, "deepseek.ai/retry": NEW}
    retried = next_step(observed(status, annotations=left, settings=manual))
    assert retried.status["rollout"]["phase"] == "Provisioning"
    assert retried.stale_annotations == {"deepseek.ai/abort": NEW, "deepseek.ai/promote": NEW}
    # the next pass sees the annotations without them (the reconciler removed them): the attempt goes on ...
    remaining = {"deepseek.ai/retry": NEW}
    going = next_step(observed({**status, **retried.status}, annotations=remaining, settings=manual))
    assert going.status["rollout"]["phase"] == "Starting"
    # ... and once verified it waits for a promotion given to this attempt
    verifying = {**going.status, "rollout": {**going.status["rollout"], "phase": "Verifying",
                                             "analysis": {"stage": "Verifying", "passed": True}}}
    waiting = next_step(observed(verifying, annotations=remaining, settings=manual, green=ready("green", NEW, 1)))
    assert waiting.status["rollout"]["phase"] == "AwaitingPromotion"


def test_a_revision_tried_again_under_other_settings_also_drops_its_old_abort() -> None:
    status = {**stable_status(), "failedRevision": NEW, "failedSettings": {"progressDeadlineSeconds": 60},
              "rollout": {"phase": "Degraded", "revision": NEW, "color": "green", "reason": "Aborted"}}
    retried = next_step(observed(status, annotations={"deepseek.ai/abort": NEW, "deepseek.ai/promote": OLD},
                                 settings=settings_of(progressDeadlineSeconds=600)))
    assert retried.status["rollout"]["phase"] == "Provisioning"
    assert retried.stale_annotations == {"deepseek.ai/abort": NEW}  # one naming another revision is not its own


def test_a_first_attempt_keeps_a_promotion_given_ahead_of_it() -> None:
    """A promotion set before a revision's first attempt is an approval given in advance, not a leftover."""
    manual = RolloutSettings(**{**SETTINGS.__dict__, "auto_promote": False})
    started = next_step(observed(stable_status(), annotations={"deepseek.ai/promote": NEW}, settings=manual))
    assert started.status["rollout"]["phase"] == "Provisioning" and started.stale_annotations == {}


def test_post_verifying_with_too_few_requests_gives_no_verdict() -> None:
    """Under 10 requests after the switch the error rate is not judged: the analysis says so and carries no
    `passed` (it said passed: false for 9 failed requests while the rollout completed)."""
    status = {**stable_status(phase="PostVerifying", switchedAt=format_time(NOW - 61)),
              "activeColor": "green", "activeRevision": NEW}
    kwargs = {"green": ready("green", NEW, 2), "service": ("green", NEW)}
    few = next_step(observed(status, live=LiveTraffic(9, 9), **kwargs))
    assert few.status["rollout"]["phase"] == "Completed"
    analysis = few.status["rollout"]["analysis"]
    assert "passed" not in analysis and (analysis["requests"], analysis["errors"]) == (9, 9)
    assert analysis["message"] == "9 server error(s) in 9 request(s) on green: not judged until 10 requests have come"
    enough = next_step(observed(status, live=LiveTraffic(10, 10), **kwargs))
    assert enough.status["rollout"]["phase"] == "RollingBack"
    assert enough.status["rollout"]["analysis"]["passed"] is False


def test_status_names_the_revision_the_spec_asks_for() -> None:
    assert next_step(observed(stable_status(), desired=OLD)).status["desiredRevision"] == OLD
    assert next_step(observed(stable_status())).status["desiredRevision"] == NEW
