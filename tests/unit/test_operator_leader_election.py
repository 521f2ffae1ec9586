"""Leader election's pure rules: the Lease body a candidate writes, when it may write it, and the settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from deepseek_operator.__main__ import build_parser, settings_from_args
from deepseek_operator.leader_election import (
    LeaderElectionConfig,
    claimed_lease,
    lease_holder,
    may_take,
    micro_time,
    record_of,
    released_lease,
)
from deepseek_operator.settings import OperatorSettings, settings_from_env

NOW = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
ME = LeaderElectionConfig(namespace="ops", name="deepseek-operator", identity="pod-a_1")


def held(holder: str, *, duration: int = 15, transitions: int = 3) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "deepseek-operator", "namespace": "ops", "resourceVersion": "42"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                     "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": "2026-01-02T03:04:00.000000Z",
                     "leaseTransitions": transitions}}


def test_micro_time_is_kubernetes_microtime():
    assert micro_time(NOW) == "2026-01-02T03:04:05.123456Z"
    assert micro_time(NOW.astimezone(timezone(timedelta(hours=8)))) == "2026-01-02T03:04:05.123456Z"


def test_a_new_lease_names_us_with_the_duration():
    body = claimed_lease(None, ME, NOW, namespace="ops")
    assert body["metadata"] == {"name": "deepseek-operator", "namespace": "ops"}
    assert body["spec"] == {"holderIdentity": "pod-a_1", "leaseDurationSeconds": 15, "leaseTransitions": 0,
                            "acquireTime": "2026-01-02T03:04:05.123456Z", "renewTime": "2026-01-02T03:04:05.123456Z"}


def test_renewing_keeps_acquire_time_transitions_and_resource_version():
    body = claimed_lease(held("pod-a_1"), ME, NOW, namespace="ops")
    assert body["metadata"]["resourceVersion"] == "42", "the write must be conditional on what was read"
    assert body["spec"]["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    assert body["spec"]["renewTime"] == "2026-01-02T03:04:05.123456Z"
    assert body["spec"]["leaseTransitions"] == 3


def test_taking_over_counts_a_transition_and_restarts_acquire_time():
    body = claimed_lease(held("pod-b_2"), ME, NOW, namespace="ops")
    assert body["spec"]["holderIdentity"] == "pod-a_1"
    assert body["spec"]["leaseTransitions"] == 4
    assert body["spec"]["acquireTime"] == body["spec"]["renewTime"] == "2026-01-02T03:04:05.123456Z"
    assert body["metadata"]["resourceVersion"] == "42"


def test_release_empties_the_holder_and_shortens_the_lease():
    body = released_lease(held("pod-a_1"), NOW)
    assert lease_holder(body) == "" and body["spec"]["leaseDurationSeconds"] == 1
    assert body["metadata"]["resourceVersion"] == "42"


@pytest.mark.parametrize(("lease", "observed_at", "now", "expected"), [
    (None, 0.0, 0.0, True),                      # no Lease yet
    (held(""), 100.0, 100.0, True),              # released
    (held("pod-a_1"), 100.0, 100.0, True),       # ours: renew
    (held("pod-b_2"), 100.0, 114.9, False),      # another's, seen changing 14.9 s ago (< 15 s)
    (held("pod-b_2"), 100.0, 115.0, True),       # unchanged for the whole lease duration: expired
    (held("pod-b_2", duration=60), 100.0, 130.0, False),  # the Lease's own duration counts, not ours
])
def test_may_take_only_free_own_or_expired_by_our_own_clock(lease, observed_at, now, expected):
    assert may_take(lease, "pod-a_1", observed_at=observed_at, now=now, default_duration=15) is expected


def test_record_changes_with_every_renewal():
    renewed = held("pod-b_2")
    renewed["spec"]["renewTime"] = "2026-01-02T03:04:02.000000Z"
    assert record_of(held("pod-b_2")) != record_of(renewed)
    assert record_of(held("pod-b_2")) == record_of(held("pod-b_2"))


@pytest.mark.parametrize(("timings", "message"), [
    ((15, 15, 2), "longer than the renew deadline"),
    ((15, 10, 9), "retry period"),
    ((15, 10, 0), "positive"),
])
def test_config_rejects_timings_that_let_two_leaders_act(timings, message):
    lease, renew, retry = timings
    config = LeaderElectionConfig(namespace="ops", name="x", identity="i", lease_duration=lease,
                                  renew_deadline=renew, retry_period=retry)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_settings_from_env_and_flags():
    settings = settings_from_env({"DEEPSEEK_OPERATOR_ALL_NAMESPACES": "true",
                                  "DEEPSEEK_OPERATOR_LEADER_ELECTION": "true",
                                  "DEEPSEEK_OPERATOR_LEADER_ELECTION_NAMESPACE": "ops",
                                  "DEEPSEEK_OPERATOR_LEADER_ELECTION_LEASE_DURATION": "30s"})
    settings.validate()
    config = settings.leader_election_config("pod-a_1")
    assert (config.namespace, config.name, config.lease_duration, config.renew_deadline, config.retry_period) == \
        ("ops", "deepseek-operator", 30.0, 10.0, 2.0)
    args = build_parser().parse_args(["-A", "--no-leader-election"])
    assert settings_from_args(args, settings).leader_election is False
    args = build_parser().parse_args(["-A", "--leader-election", "--leader-election-lease-name", "ops-lock",
                                      "--leader-election-renew-deadline", "20s"])
    changed = settings_from_args(args, OperatorSettings(leader_election_namespace="ops"))
    assert changed.leader_election and changed.leader_election_lease_name == "ops-lock"
    with pytest.raises(ValueError, match="lease duration"):
        changed.validate()  # 15 s lease, 20 s renew deadline


def test_leader_election_without_a_namespace_says_how_to_give_one(tmp_path, monkeypatch):
    monkeypatch.setattr("deepseek_operator.leader_election.SERVICE_ACCOUNT_NAMESPACE", str(tmp_path / "none"))
    settings = OperatorSettings(all_namespaces=True, leader_election=True)
    with pytest.raises(ValueError, match="--leader-election-namespace"):
        settings.validate()


def test_the_standby_liveness_endpoint_serves_an_ipv6_address():
    """`--liveness http://[::]:PORT/healthz` (an IPv6-only pod network): it served nothing and failed at start with
    'Address family for hostname not supported'."""
    import socket
    import urllib.request

    from deepseek_operator.leader_election import StandbyLiveness

    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
    with StandbyLiveness(f"http://[::1]:{port}/healthz", lambda: True), \
            urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=5) as response:
        assert response.status == 200 and response.read() == b'{"leaderElection": "standby"}'
