"""Status written by another operator version is read tolerantly: fields it added are ignored, fields it lacks get
their defaults, times in any RFC 3339 form are read, and nothing about it fails a reconcile or starts a rollout."""

from __future__ import annotations

from typing import Any

import pytest
from deepseek_operator.apikey_plan import (
    IssuerView,
    build_grant,
    current_binding,
    plan_apikey,
    promote_pending,
    with_pending,
)
from deepseek_operator.auth_config import Limits
from deepseek_operator.conditions import Condition, merge_conditions
from deepseek_operator.deployment_status import issuer_status
from deepseek_operator.rollout import (
    ColorObservation,
    Observed,
    RolloutSettings,
    ScaleColor,
    format_time,
    next_step,
    parse_time,
    read_rollout_status,
)
from deepseek_operator.signing_keys import signing_key_from_seed
from deepseek_operator.tokens import binding_hash, sign_token

NOW = 1_800_000_000.0
OLD, NEW = "aaaaaaaaaa", "bbbbbbbbbb"
SETTINGS = RolloutSettings(replicas=1, preview_replicas=1, progress_deadline=600, window=60, scale_down_delay=120,
                           history_limit=3, max_error_rate=0.05, progressing_interval=1.0, stable_interval=30.0)
KEY = signing_key_from_seed(b"\x01" * 32, created_at=0, sign_from=0)


def ready(color: str, revision: str) -> ColorObservation:
    return ColorObservation(exists=True, revision=revision, replicas=1, ready_pods=(f"{color}-0",), pods=1)


def observed(status: dict[str, Any], *, desired: str = OLD, service: tuple[str, str] | None = ("blue", OLD),
             blue: ColorObservation | None = None, green: ColorObservation | None = None) -> Observed:
    return Observed(now=NOW, desired_revision=desired, settings=SETTINGS, status=status,
                    colors={"blue": blue or ready("blue", OLD), "green": green or ColorObservation()},
                    service_target=service, summary={"model": "tiny"})


# A status as the first release wrote it, with fields a later release might add (and an earlier one never knew).
SERVING_STATUS: dict[str, Any] = {
    "observedGeneration": 3,
    "activeColor": "blue",
    "activeRevision": OLD,
    "previewRevision": None,
    "readyReplicas": 1,
    "endpoint": "http://chat.ns.svc:8000/v1",
    "rollout": {"phase": "Completed", "revision": OLD, "color": "blue", "startedAt": format_time(NOW - 600),
                "switchedAt": format_time(NOW - 500), "scaleDownAt": format_time(NOW - 300),
                "message": "revision aaaaaaaaaa serves on blue", "canarySteps": [{"weight": 10}]},
    "history": [{"revision": OLD, "result": "Completed", "at": format_time(NOW - 400), "model": "tiny",
                 "durationSeconds": 12}],
    "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "",
                    "lastTransitionTime": format_time(NOW - 500), "observedGeneration": 3},
                   {"type": "Autoscaled", "status": "True", "reason": "AtTarget", "message": ""}],
    "autoscaling": {"currentReplicas": 1},
}


def test_a_served_deployment_with_unknown_fields_is_left_as_it_is() -> None:
    decision = next_step(observed(SERVING_STATUS))
    assert decision.scale == [] and decision.switch is None and decision.events == []
    assert decision.status["activeColor"] == "blue" and decision.status["activeRevision"] == OLD
    assert decision.status["history"] == SERVING_STATUS["history"]  # entries are kept whole, unknown keys too
    assert decision.status["rollout"]["canarySteps"] == [{"weight": 10}]
    assert "autoscaling" not in decision.status  # not the rollout's field: not written, so not removed either
    ready_condition = next(c for c in decision.conditions if c.type == "Ready")
    assert ready_condition.status is True


def test_missing_newer_fields_get_their_defaults() -> None:
    status = {"activeColor": "blue", "activeRevision": OLD}  # no rollout, history, failed or retried revision
    assert read_rollout_status(status) == {"activeColor": "blue", "activeRevision": OLD, "failedRevision": None,
                                           "failedSettings": None, "retriedRevision": None, "rollout": None,
                                           "history": []}
    decision = next_step(observed(status))
    assert decision.scale == [] and decision.switch is None and decision.status["history"] == []


@pytest.mark.parametrize(("scale_down_at", "scaled"), [
    ("2027-01-15T07:59:59.750+00:00", True),  # due: a quarter second ago
    ("2027-01-15T09:00:01+01:00", False),  # a second from now, written with an offset
])
def test_scale_down_time_in_another_rfc3339_form_is_honoured(scale_down_at: str, scaled: bool) -> None:
    status = {**SERVING_STATUS, "rollout": {**SERVING_STATUS["rollout"], "scaleDownAt": scale_down_at}}
    decision = next_step(observed(status, green=ready("green", NEW)))
    assert decision.scale == ([ScaleColor("green", 0, None)] if scaled else [])


@pytest.mark.parametrize(("text", "expected"), [
    ("2027-01-15T08:00:00Z", 1_800_000_000.0),
    ("2027-01-15T08:00:00.5Z", 1_800_000_000.5),
    ("2027-01-15T09:00:00+01:00", 1_800_000_000.0),
    ("2027-01-15T08:00:00", 1_800_000_000.0),
    ("", None),
    (None, None),
    ("next tuesday", None),
    (1_800_000_000, None),
])
def test_times_are_read_in_any_rfc3339_form_and_unreadable_ones_count_as_unset(text: Any, expected: Any) -> None:
    assert format_time(NOW) == "2027-01-15T08:00:00Z"
    assert parse_time(text) == expected


def test_a_rollout_in_progress_is_continued_from_what_the_previous_operator_wrote() -> None:
    status = {**SERVING_STATUS, "rollout": {"phase": "AwaitingPromotion", "revision": NEW, "color": "green",
                                            "startedAt": format_time(NOW - 60), "stepWeight": 50}}
    decision = next_step(Observed(now=NOW, desired_revision=NEW, settings=SETTINGS, status=status,
                                  colors={"blue": ready("blue", OLD), "green": ready("green", NEW)},
                                  annotations={"deepseek.ai/promote": NEW}, service_target=("blue", OLD)))
    assert decision.status["rollout"]["phase"] == "Promoting" and decision.status["rollout"]["revision"] == NEW
    assert [e.reason for e in decision.events] == []


def test_a_rollout_in_progress_it_cannot_continue_starts_over_instead_of_failing() -> None:
    status = {**SERVING_STATUS, "rollout": {"phase": "Verifying", "revision": NEW, "target": "green"}}  # no color
    decision = next_step(observed(status, desired=NEW))
    assert (decision.status["rollout"]["phase"], decision.status["rollout"]["color"]) == ("Provisioning", "green")
    assert [e.reason for e in decision.events] == ["RolloutStarted"]
    assert decision.status["activeColor"] == "blue"  # traffic stays where it is


@pytest.mark.parametrize("bad", [{"history": "none"}, {"history": ["Completed", None]}, {"rollout": "Completed"},
                                 {"activeColor": "purple"}])
def test_malformed_fields_read_as_absent(bad: dict[str, Any]) -> None:
    read = read_rollout_status({"activeRevision": OLD, **bad})
    assert read["history"] == [] and read["rollout"] is None and read["activeColor"] is None


def test_issuer_status_keeps_fields_and_conditions_it_does_not_own() -> None:
    status = issuer_status(SERVING_STATUS, ready=True, reason="Ready", message="", signing_key_id="kid-1",
                           auth_configmap="chat-auth", generation=3, now=format_time(NOW), auth_config_size=100)
    assert status["autoscaling"] == {"currentReplicas": 1}
    assert {c["type"] for c in status["conditions"]} >= {"Autoscaled", "IssuerReady", "AuthConfigFull", "Ready"}


def test_conditions_without_timestamps_get_one_and_keep_it_while_unchanged() -> None:
    first = merge_conditions([{"type": "Ready", "status": "True"}], [Condition("Ready", True, "Serving", "")],
                             now="2027-01-15T08:00:00Z", generation=2)
    assert first[0]["lastTransitionTime"] == "2027-01-15T08:00:00Z"
    again = merge_conditions(first, [Condition("Ready", True, "Serving", "")], now="2027-01-15T09:00:00Z",
                             generation=2)
    assert again[0]["lastTransitionTime"] == "2027-01-15T08:00:00Z"


# ---------------------------------------------------------------------------------------------------- ApiKey
def issuer() -> IssuerView:
    return IssuerView(deployment="chat", issuer="deepseek-operator/ns/chat", audience="ns/chat",
                      base_url="http://chat.ns.svc:8000/v1", signing_key=KEY, published_kids=frozenset({KEY.kid}),
                      default_scopes=("model:predict",), default_limits=Limits(10, 20), limits_entry=None)


def settled_key(extra_status: dict[str, Any]) -> tuple[dict[str, Any], str]:
    key = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey",
           "metadata": {"name": "alice", "namespace": "ns", "uid": "uid-1", "generation": 1},
           "spec": {"deploymentRef": {"name": "chat"}, "subject": "alice", "environment": "dev", "duration": "72h",
                    "renewBefore": "24h", "gracePeriod": "1h", "revoked": False}, "status": {}}
    grant = build_grant(key, issuer(), token_id="tok-1", now=int(NOW))
    token = sign_token(grant, KEY)
    status = with_pending({}, grant=grant, token=token, signing_key_id=KEY.kid, reason="Initial",
                          binding=current_binding(key, issuer()), previous_revoke_at=None)
    status = {**promote_pending(status, 24 * 3600), "secretName": "alice-apikey", **extra_status}
    return {**key, "status": status}, token


@pytest.mark.parametrize("extra", [
    {},  # exactly the fields the first release writes
    {"delivery": {"attempts": 1}, "previousTokens": [{"tokenId": "tok-0", "expiresAt": format_time(NOW + 3600),
                                                      "revokeAt": format_time(NOW + 600), "signingKeyId": KEY.kid,
                                                      "revokedBy": "rotation"}]},
    {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Expiring", "status": "False"}]},
])
def test_a_settled_key_with_fields_of_another_version_is_not_reissued(extra: dict[str, Any]) -> None:
    key, token = settled_key(extra)
    plan = plan_apikey(key, secret_exists=True, secret_token=token, secret_current=True, issuer=issuer(),
                       now=int(NOW) + 60)
    assert plan.issue_reason is None and plan.revoke == {} and not plan.repair_secret and not plan.delete_secret
    assert plan.status["tokenId"] == "tok-1" and plan.status["revision"] == key["status"]["revision"]


def test_a_scope_widening_keeps_the_old_token_only_when_status_says_which_scopes_it_holds() -> None:
    key, token = settled_key({})
    wider = {**key["spec"], "scopes": ["model:predict", "history:read"]}

    def widen(status: dict[str, Any]) -> tuple[str | None, dict[str, int]]:
        plan = plan_apikey({**key, "spec": wider, "status": status}, secret_exists=True, secret_token=token,
                           secret_current=True, issuer=issuer(), now=int(NOW) + 60)
        return plan.issue_reason, plan.revoke

    revoked_at_once = {"tok-1": int(NOW) + 72 * 3600}
    # Written by this version: the widening keeps the old token for its grace period.
    assert widen(key["status"]) == ("ScopesWidened", {})
    # Written by an older operator, which did not record the token's scopes: revoked at once, as it always was.
    older = {name: value for name, value in key["status"].items() if name != "tokenScopes"}
    assert widen(older) == ("BindingChanged", revoked_at_once)
    # Recorded, but not the scopes the token binds (an older operator replaced the token and kept the field).
    stale = {**key["status"], "tokenScopes": ["model:predict"],
             "bindingHash": binding_hash(subject="alice", scopes=["history:read"], environment="dev",
                                         audience="ns/chat")}
    assert widen(stale) == ("BindingChanged", revoked_at_once)


def test_key_times_written_with_fractions_are_read() -> None:
    key, token = settled_key({})
    status = dict(key["status"])
    status["expiresAt"] = status["expiresAt"].replace("Z", ".000000Z")
    status["renewalTime"] = status["renewalTime"].replace("Z", "+00:00")
    plan = plan_apikey({**key, "status": status}, secret_exists=True, secret_token=token, secret_current=True,
                       issuer=issuer(), now=int(NOW) + 60)
    assert plan.issue_reason is None and plan.revoke == {}
