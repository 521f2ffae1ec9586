"""The autoscaler's arithmetic (pure): recommendation, stabilization windows, holds, status, and how the rollout
takes its replica count from it."""

from __future__ import annotations

from deepseek_operator.autoscaler import (
    Autoscaler,
    AutoscalingSettings,
    Load,
    Sample,
    autoscaling_status,
    decide,
    effective_replicas,
    metric_value,
    recommend,
    stabilize,
    trim_history,
    window_values,
)
from deepseek_operator.capacity import CapacityShortage
from deepseek_operator.revision import compute_revision
from deepseek_operator.rollout import ColorObservation, Observed, RolloutSettings, ScaleColor, next_step

SETTINGS = AutoscalingSettings(min_replicas=1, max_replicas=4, metric="InFlightRequests", target=4.0,
                               scale_up_window=30.0, scale_down_window=120.0)
NOW = 1_800_000_000.0


def history(*points: tuple[float, int]) -> list[Sample]:
    """Samples at `NOW - age` seconds, given as (age, replicas), oldest first."""
    return [Sample(NOW - age, replicas) for age, replicas in points]


def test_recommendation_is_total_over_target_rounded_up_within_bounds() -> None:
    assert recommend(0, SETTINGS) == 1  # no load: minReplicas
    assert recommend(4, SETTINGS) == 1
    assert recommend(4.5, SETTINGS) == 2
    assert recommend(12, SETTINGS) == 3
    assert recommend(16, SETTINGS) == 4
    assert recommend(100, SETTINGS) == 4  # maxReplicas
    assert recommend(12.000000001, SETTINGS) == 3  # float noise in a summed gauge is not a replica


def test_scale_up_needs_the_whole_up_window_above_current() -> None:
    # above for 20 s only: the window (30 s) is not covered by higher recommendations
    assert stabilize(history((60, 1), (20, 3), (10, 3), (0, 3)), 1, NOW, SETTINGS) == 1
    # above for the whole 30 s: up to the lowest recommendation of the window
    assert stabilize(history((40, 2), (25, 4), (0, 3)), 1, NOW, SETTINGS) == 2
    assert stabilize(history((40, 4), (25, 4), (0, 3)), 1, NOW, SETTINGS) == 3


def test_scale_down_goes_only_to_the_highest_recommendation_of_the_down_window() -> None:
    assert stabilize(history((200, 4), (100, 1), (0, 1)), 4, NOW, SETTINGS) == 4  # the 4 was in force 120 s ago
    assert stabilize(history((130, 1), (60, 2), (0, 1)), 4, NOW, SETTINGS) == 2
    assert stabilize(history((130, 1), (0, 1)), 4, NOW, SETTINGS) == 1


def test_no_scaling_before_the_history_covers_a_window() -> None:
    """Just (re)started: a partial window neither scales up nor down."""
    assert window_values(history((10, 3)), NOW, 30) is None
    assert stabilize(history((10, 4), (0, 4)), 1, NOW, SETTINGS) == 1
    assert stabilize(history((100, 1), (0, 1)), 4, NOW, SETTINGS) == 4
    zero = AutoscalingSettings(min_replicas=1, max_replicas=4, scale_up_window=0, scale_down_window=0)
    assert stabilize(history((0, 3)), 1, NOW, zero) == 3  # a window of 0 acts on the latest recommendation
    assert stabilize(history((0, 2)), 4, NOW, zero) == 2


def test_trim_keeps_what_the_longest_window_needs() -> None:
    samples = history((500, 4), (300, 3), (119, 2), (0, 1))
    assert trim_history(samples, NOW, SETTINGS) == history((300, 3), (119, 2), (0, 1))


def test_a_partial_reading_before_the_load_drops_does_not_shorten_the_down_window() -> None:
    # Busy at 3 replicas; 5 s before the load drops, one pod is too busy to answer /metrics and the two others are
    # between requests. The down-window (120 s) runs from the drop, not from that reading.
    busy = [Sample(NOW - 130, 3), Sample(NOW - 125, 1, complete=False)]
    idle = [Sample(NOW - age, 1) for age in range(120, -1, -10)]  # the load dropped 120 s ago
    assert stabilize([*busy, *idle[:-1]], 3, NOW - 5, SETTINGS) == 3
    assert stabilize([*busy, *idle], 3, NOW, SETTINGS) == 1
    # a partial reading is a lower bound: it still counts towards scaling up
    assert stabilize([Sample(NOW - 40, 4), Sample(NOW - 10, 4, complete=False)], 1, NOW, SETTINGS) == 4
    assert stabilize([Sample(NOW - 40, 4), Sample(NOW - 10, 2, complete=False)], 1, NOW, SETTINGS) == 2
    # trimming keeps the complete reading in force at the down-window's start
    assert trim_history([*busy, *idle], NOW - 2, SETTINGS) == [*busy, *idle]
    assert trim_history([*busy, *idle], NOW, SETTINGS) == idle


def test_decide_scales_up_and_down_with_words() -> None:
    up = decide(SETTINGS, current=1, load=Load(14, 1, 1), history=history((40, 4), (0, 4)), now=NOW, rollout=None,
                pending_for_gpus=0)
    assert (up.desired, up.direction, up.recommendation) == (4, "up", 4)
    assert "14 request(s) in flight on 1 ready pod(s), 14 per replica against a target of 4" in up.reason
    down = decide(SETTINGS, current=4, load=Load(1, 4, 4), history=history((130, 1), (0, 1)), now=NOW, rollout=None,
                  pending_for_gpus=0)
    assert (down.desired, down.direction) == (1, "down")
    waiting = decide(SETTINGS, current=4, load=Load(1, 4, 4), history=history((60, 1), (0, 1)), now=NOW,
                     rollout=None, pending_for_gpus=0)
    assert (waiting.desired, waiting.direction) == (4, None)
    assert "waiting out the 120 s stabilization window" in waiting.reason


def test_decide_holds_during_a_rollout_without_load_and_when_gpus_run_out() -> None:
    busy = history((40, 4), (0, 4))
    rollout = decide(SETTINGS, current=2, load=Load(16, 2, 2), history=busy, now=NOW, rollout="Promoting",
                     pending_for_gpus=0)
    assert (rollout.desired, rollout.direction) == (2, None) and "rollout is Promoting" in rollout.reason
    blind = decide(SETTINGS, current=2, load=None, history=busy, now=NOW, rollout=None, pending_for_gpus=0)
    assert (blind.desired, blind.direction) == (2, None) and "no ready pod" in blind.reason
    capacity = decide(SETTINGS, current=3, load=Load(16, 2, 2), history=busy, now=NOW, rollout=None,
                      pending_for_gpus=1)
    assert (capacity.desired, capacity.direction, capacity.held_for_capacity) == (3, None, True)
    assert "1 pod(s) already wait for GPUs" in capacity.reason
    # pending pods never block scaling down, and a pod that did not answer /metrics blocks it (its load is unknown)
    idle = history((130, 1), (0, 1))
    assert decide(SETTINGS, current=3, load=Load(0, 2, 2), history=idle, now=NOW, rollout=None,
                  pending_for_gpus=1).desired == 1
    assert decide(SETTINGS, current=3, load=Load(0, 1, 2), history=idle, now=NOW, rollout=None,
                  pending_for_gpus=0).desired == 3


def test_decide_brings_a_count_outside_new_bounds_back_at_once() -> None:
    narrowed = AutoscalingSettings(min_replicas=2, max_replicas=3)
    assert decide(narrowed, current=5, load=None, history=[], now=NOW, rollout=None,
                  pending_for_gpus=0).desired == 3
    assert decide(narrowed, current=1, load=None, history=[], now=NOW, rollout="Starting",
                  pending_for_gpus=0).desired == 2


def test_status_keeps_the_last_scale_until_the_next_one() -> None:
    load = Load(14, 2, 2)
    scaled = decide(SETTINGS, current=1, load=load, history=history((40, 4), (0, 4)), now=NOW, rollout=None,
                    pending_for_gpus=0)
    block = autoscaling_status(scaled, previous={}, current_replicas=1, load=load, settings=SETTINGS,
                               now="2027-01-15T08:00:00Z")
    assert block["desiredReplicas"] == 4 and block["currentReplicas"] == 1
    assert block["load"] == {"total": 14, "perReplica": 7, "pods": 2}
    assert block["lastScaleTime"] == "2027-01-15T08:00:00Z" and block["lastScaleReason"] == scaled.reason
    steady = decide(SETTINGS, current=4, load=load, history=history((40, 4), (0, 4)), now=NOW + 10, rollout=None,
                    pending_for_gpus=0)
    later = autoscaling_status(steady, previous=block, current_replicas=4, load=load, settings=SETTINGS,
                               now="2027-01-15T08:00:10Z")
    assert later["lastScaleTime"] == "2027-01-15T08:00:00Z" and later["lastScaleReason"] == scaled.reason


def test_metric_value_sums_samples_of_one_name() -> None:
    text = ("# HELP deepseek_requests_in_flight x\n# TYPE deepseek_requests_in_flight gauge\n"
            "deepseek_requests_in_flight 3.0\ndeepseek_queue_depth 7.0\n"
            'deepseek_api_requests_total{route="/v1/chat/completions",status="200"} 5.0\n')
    assert metric_value(text, "deepseek_requests_in_flight") == 3.0
    assert metric_value(text, "deepseek_queue_depth") == 7.0
    assert metric_value(text, "deepseek_missing") is None


SPEC = {"model": {"name": "tiny"}, "image": "deepseek-server:1", "replicas": 2,
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 5}}


def test_effective_replicas_follow_the_autoscaler_and_start_from_spec() -> None:
    assert effective_replicas({**SPEC, "autoscaling": {"enabled": False}}, {"autoscaling": {"desiredReplicas": 4}}) == 2
    assert effective_replicas(SPEC, {}) == 2  # before the first decision: spec.replicas
    assert effective_replicas({**SPEC, "replicas": 0}, {}) == 1  # kept within the bounds
    assert effective_replicas(SPEC, {"autoscaling": {"desiredReplicas": 4}}) == 4
    assert effective_replicas(SPEC, {"autoscaling": {"desiredReplicas": 9}}) == 5


def test_autoscaling_and_its_decisions_never_change_the_revision() -> None:
    plain = {key: value for key, value in SPEC.items() if key != "autoscaling"}
    assert compute_revision(SPEC) == compute_revision(plain) == compute_revision({**SPEC, "replicas": 7})


def test_rollout_scales_the_active_color_to_the_autoscalers_count_and_starts_new_colors_at_it() -> None:
    status = {"activeColor": "blue", "activeRevision": "aaaaaaaaaa", "history": [],
              "autoscaling": {"desiredReplicas": 3}}
    settings = RolloutSettings.from_spec(SPEC, progressing_interval=1, stable_interval=30, status=status)
    assert settings.replicas == 3
    blue = ColorObservation(exists=True, revision="aaaaaaaaaa", replicas=1, ready_pods=("b-0",), pods=1)
    steady = next_step(Observed(now=NOW, desired_revision="aaaaaaaaaa", settings=settings, status=status,
                                colors={"blue": blue, "green": ColorObservation()},
                                service_target=("blue", "aaaaaaaaaa")))
    assert steady.scale == [ScaleColor("blue", 3, None)]
    # a new revision: verified on previewReplicas, then promoted at the autoscaler's count
    promoting = {**status, "rollout": {"phase": "Promoting", "revision": "bbbbbbbbbb", "color": "green",
                                       "verifiedPods": ["g-0"], "deadline": "2030-01-01T00:00:00Z"}}
    green = ColorObservation(exists=True, revision="bbbbbbbbbb", replicas=1, ready_pods=("g-0",), pods=1)
    decision = next_step(Observed(now=NOW, desired_revision="bbbbbbbbbb", settings=settings, status=promoting,
                                  colors={"blue": ColorObservation(exists=True, revision="aaaaaaaaaa", replicas=3,
                                                                   ready_pods=("b-0", "b-1", "b-2"), pods=3),
                                          "green": green},
                                  service_target=("blue", "aaaaaaaaaa")))
    assert ScaleColor("green", 3, None) in decision.scale


def test_capacity_condition_gives_the_autoscalers_numbers() -> None:
    status = {"activeColor": "blue", "activeRevision": "aaaaaaaaaa", "history": [],
              "autoscaling": {"desiredReplicas": 3}}
    settings = RolloutSettings.from_spec(SPEC, progressing_interval=1, stable_interval=30, status=status)
    shortage = CapacityShortage(1, 8, "nvidia.com/gpu", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
    blue = ColorObservation(exists=True, revision="aaaaaaaaaa", replicas=3, ready_pods=("b-0", "b-1"), pods=3,
                            shortage=shortage)
    decision = next_step(Observed(now=NOW, desired_revision="aaaaaaaaaa", settings=settings, status=status,
                                  colors={"blue": blue, "green": ColorObservation()},
                                  service_target=("blue", "aaaaaaaaaa")))
    capacity = next(c for c in decision.conditions if c.type == "CapacityAvailable")
    assert capacity.status is False and capacity.reason == "InsufficientGPU"
    assert "the autoscaler wants 3 replica(s): 2 ready, 1 pending for GPUs" in capacity.message
    assert "8 more needed" in capacity.message


def test_a_spike_seen_only_in_partial_readings_holds_the_replicas_for_the_down_window() -> None:
    """Partial readings (a busy pod's /metrics timed out) are lower bounds of the load: in the down-window they keep
    the replicas up as complete ones do (they were left out of it, so a spike seen through them scaled back down
    10 s after it ended instead of a down-window later)."""
    settings = AutoscalingSettings(min_replicas=1, max_replicas=8, target=4.0, scale_up_window=30.0,
                                   scale_down_window=300.0)
    samples = [Sample(NOW - age, 2) for age in range(400, 70, -10)]  # steady at 2, complete
    samples += [Sample(NOW - age, 6, complete=False) for age in range(60, 0, -10)]  # the spike, partial readings
    samples += [Sample(NOW, 2)]  # the spike is over: a complete reading recommends 2 again
    assert stabilize(samples, 6, NOW, settings) == 6
    later = [*samples, *(Sample(NOW + age, 2) for age in range(10, 301, 10))]
    assert stabilize(later, 6, NOW + 300, settings) == 2  # a whole down-window after the spike


def test_a_reading_from_before_a_gap_does_not_stand_for_the_gap() -> None:
    """During a rollout (or while no pod reports) nothing is recorded; the reading from before is not in force
    through that time, so the first reading after it neither scales up nor down: the windows fill again."""
    settings = AutoscalingSettings(min_replicas=1, max_replicas=8, target=4.0, scale_up_window=30.0,
                                   scale_down_window=300.0)
    for before, after, current in ((4, 4, 2), (1, 1, 2)):
        samples = [Sample(NOW - 600 - age, before) for age in range(300, -1, -10)]  # up to the rollout's start
        samples.append(Sample(NOW, after))  # the first reading after a 600 s rollout
        decision = decide(settings, current=current, load=Load(after * 4 - 1, 2, 2), history=samples, now=NOW,
                          rollout=None, pending_for_gpus=0, max_gap=30.0)
        assert (decision.desired, decision.direction) == (current, None), decision.reason
        assert stabilize(samples, current, NOW, settings) != current  # without max_gap the old reading bridged it
    steady = [Sample(NOW - age, 4) for age in range(40, -1, -10)]
    assert window_values(steady, NOW, 30, max_gap=30.0) == [4, 4, 4, 4]
    assert window_values([Sample(NOW - 45, 4), Sample(NOW, 4)], NOW, 30, max_gap=30.0) is None


def test_a_metric_the_server_does_not_know_now_is_no_reading() -> None:
    """A gateway whose engine did not answer reports its queue depth as NaN: that pod did not report."""
    assert metric_value("deepseek_queue_depth NaN\n", "deepseek_queue_depth") is None
    assert metric_value("deepseek_queue_depth 3.0\n", "deepseek_queue_depth") == 3.0


def test_a_short_interval_with_a_pod_slow_to_answer_still_scales_up() -> None:
    """With a 1 s interval, looks that each wait 3 s for a slow pod land 4 s apart: that is no gap in what the
    autoscaler watched (it never scaled up when the allowed spacing was three intervals)."""
    class SlowPodReader:  # one of two pods always times out: every reading is partial and high
        def read(self, pod_ips: list[str], metric: str) -> Load:
            return Load(total=20.0, pods=1, ready=2)

    now = [NOW]
    autoscaler = Autoscaler(SlowPodReader(), clock=lambda: now[0], interval=1.0)  # type: ignore[arg-type]
    dsd = {"metadata": {"namespace": "ns", "name": "chat", "uid": "u"},
           "spec": {"replicas": 2, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 8}},
           "status": {"autoscaling": {"desiredReplicas": 2}}}
    decisions = []
    for _ in range(12):  # 44 s of looks 4 s apart, past the 30 s up-window
        _, decision = autoscaler.step(dsd, active_replicas=2, ready_pod_ips=["10.0.0.1", "10.0.0.2"],
                                      pending_for_gpus=0)
        decisions.append(decision)
        now[0] += 4.0
    assert decisions[-1].desired == 5 and any(d.direction == "up" for d in decisions)


def test_a_sample_that_is_not_a_finite_number_is_no_reading():
    """A pod's exposition with `+Inf` or a word where the value goes (a proxy's page, a broken exporter) must not fail
    the look: before, `abc` raised ValueError and `+Inf` made the recommendation raise OverflowError, which failed
    the deployment's whole reconcile."""
    text = "m 1\nm +Inf\nm -Inf\nm abc\nm NaN\nm 2\n"
    assert metric_value(text, "m") == 3.0
    assert metric_value("m +Inf\nm abc\n", "m") is None
