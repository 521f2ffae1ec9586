"""What `kubectl deepseek` decides from status and how it prints it (pure; the commands run in
tests/integration/test_kubectl_plugin.py)."""

from __future__ import annotations

from typing import Any

import pytest
from deepseek_operator.kubectl_plugin.views import (
    PluginError,
    abort_target,
    describe_deployment,
    env_exports,
    keys_table,
    promote_target,
    relative,
    retry_needs_reset,
    retry_target,
    spec_revision,
    stale_token_reason,
)

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def dsd(phase: str | None = None, revision: str = "r2", annotations: dict[str, str] | None = None,
        **status: Any) -> dict[str, Any]:
    if phase:
        status["rollout"] = {"phase": phase, "revision": revision, "color": "green",
                             "startedAt": "2027-01-15T07:58:00Z", "message": "verifying"}
    return {"metadata": {"name": "chat", "namespace": "team", "annotations": annotations or {}},
            "spec": {}, "status": status}


@pytest.mark.parametrize("phase", ["Provisioning", "Starting", "Verifying", "AwaitingPromotion", "Promoting"])
def test_promote_names_the_revision_being_rolled_out_before_the_switch(phase: str) -> None:
    assert promote_target(dsd(phase)) == "r2"


@pytest.mark.parametrize(("phase", "message"), [("PostVerifying", "already been switched"),
                                                ("Completed", "no rollout is in progress"),
                                                (None, "no rollout is in progress")])
def test_promote_after_the_switch_or_without_a_rollout_says_why_not(phase: str | None, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        promote_target(dsd(phase))


def test_abort_covers_post_verification_but_not_a_rollback() -> None:
    assert abort_target(dsd("PostVerifying")) == "r2"
    with pytest.raises(PluginError, match="already rolling back"):
        abort_target(dsd("RollingBack"))
    with pytest.raises(PluginError, match="nothing to abort"):
        abort_target(dsd("Degraded"))


def test_retry_only_the_failed_revision_the_spec_still_asks_for() -> None:
    failed = dsd("Degraded", failedRevision="r2")
    assert retry_target(failed, "r2") == "r2"
    with pytest.raises(PluginError, match="rolls out on its own"):
        retry_target(failed, "r3")
    with pytest.raises(PluginError, match="no revision has failed"):
        retry_target(dsd("Completed"), "r2")
    with pytest.raises(PluginError, match="wait for it to finish or abort it first"):
        retry_target(dsd("Starting", failedRevision="r2"), "r2")
    used = dsd("Degraded", annotations={"deepseek.ai/retry": "r2"}, failedRevision="r2", retriedRevision="r2")
    assert retry_needs_reset(used, "r2") and not retry_needs_reset(failed, "r2")
    # the annotation removed by hand, the operator not there yet: setting it again now would never be acted on
    removed = dsd("Degraded", failedRevision="r2", retriedRevision="r2")
    assert retry_needs_reset(removed, "r2")


def test_status_in_words_names_phase_colors_checks_and_next_step() -> None:
    obj = dsd("AwaitingPromotion", activeColor="blue", activeRevision="r1", readyReplicas=2,
              conditions=[{"type": "Ready", "status": "True", "reason": "Serving", "message": "2/2 ready"}],
              history=[{"revision": "r1", "result": "Completed", "at": "2027-01-14T00:00:00Z", "model": "m"}])
    obj["status"]["rollout"]["analysis"] = {"stage": "Verifying", "requests": 3, "errors": 0, "errorRate": 0.0,
                                            "p95LatencyMs": 181.4, "passed": True, "message": "3/3 ok"}
    blue = {"spec": {"replicas": 2, "template": {"metadata": {"labels": {"deepseek.ai/revision": "r1"}}}},
            "status": {"readyReplicas": 2}}
    text = describe_deployment(obj, {"blue": blue, "green": None}, [], desired_revision="r2", now=NOW)
    assert "DeepSeekDeployment team/chat: Ready: 2/2 ready" in text
    assert "revision r2 on green is AwaitingPromotion (started 2m ago" in text
    assert "Verification (Verifying): passed, 3 request(s), 0 error(s), error rate 0.0%, p95 181 ms: 3/3 ok" in text
    assert "`kubectl deepseek promote chat`" in text
    assert "blue   active" in text and "2/2 ready" in text and "green  preview        not created" in text
    assert "revision r1  Completed  (model m)" in text


def test_keys_table_and_env_exports_quote_for_the_shell() -> None:
    key = {"metadata": {"name": "alice", "namespace": "team"},
           "spec": {"deploymentRef": {"name": "chat"}, "subject": "alice", "environment": "prod",
                    "scopes": ["model:predict"]},
           "status": {"conditions": [{"type": "Ready", "status": "True"}], "expiresAt": "2027-01-18T08:00:00Z",
                      "issuedAt": "2027-01-15T07:00:00Z", "revision": 3}}
    table = keys_table([key], now=NOW).splitlines()
    assert table[1].split()[:6] == ["alice", "chat", "alice", "prod", "model:predict", "True"]
    assert "(in 3d)" in table[1] and "(60m ago)" in table[1] and table[1].endswith("3")
    assert env_exports({"OPENAI_API_KEY": "a'b", "OPENAI_BASE_URL": "http://x/v1"}) == (
        "export OPENAI_API_KEY='a'\"'\"'b'\nexport OPENAI_BASE_URL=http://x/v1")
    assert relative(None, NOW) == "-" and relative("2027-01-15T08:00:30Z", NOW) == "in 30s"
    unknown = {**key, "status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "AuthConfigUnknown"}]}}
    assert keys_table([unknown], now=NOW).splitlines()[1].split()[5:7] == ["Unknown", "(AuthConfigUnknown)"]


def test_keys_table_shows_the_scopes_a_key_on_the_deployments_default_holds() -> None:
    """A key without its own scopes shows what its token holds (status.tokenScopes), marked as the default."""
    base = {"metadata": {"name": "bob", "namespace": "team"},
            "spec": {"deploymentRef": {"name": "chat"}, "subject": "bob", "environment": "dev"}}
    known = {**base, "status": {"tokenScopes": ["model:predict", "history:read"]}}
    assert keys_table([known], now=NOW).splitlines()[1].split()[4] == "history:read,model:predict(default)"
    assert "(deployment default)" in keys_table([base], now=NOW).splitlines()[1]  # not known yet


def test_a_404_for_a_kind_is_told_apart_from_a_404_for_an_object() -> None:
    import json
    from types import SimpleNamespace

    from deepseek_operator.kubectl_plugin.cli import _kind_not_served

    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
    kind_missing = json.dumps({**status, "message": "the server could not find the requested resource",
                               "details": {}})
    object_missing = json.dumps({**status, "message": 'deepseekdeployments.deepseek.ai "tiny" not found',
                                 "details": {"name": "tiny", "group": "deepseek.ai", "kind": "deepseekdeployments"}})
    assert _kind_not_served(SimpleNamespace(body=kind_missing))
    assert not _kind_not_served(SimpleNamespace(body=object_missing))
    assert not _kind_not_served(SimpleNamespace(body=None))


def test_the_spec_revision_is_the_operators_once_it_has_seen_the_generation() -> None:
    """The operator's own revision (status.desiredRevision) wins over the plugin's: a plugin of another version
    computes another one where their defaults differ (the vLLM image), and `retry` then refused the failed
    revision the spec still asked for."""
    def ours(spec: Any) -> str:
        return "plugin-rev"
    seen = dsd(desiredRevision="operator-rev", observedGeneration=4)
    seen["metadata"]["generation"] = 4
    assert spec_revision(seen, ours) == "operator-rev"
    assert retry_target({**seen, "status": {**seen["status"], "failedRevision": "operator-rev"}},
                        spec_revision(seen, ours)) == "operator-rev"
    seen["metadata"]["generation"] = 5  # an edit the operator has not seen yet: only the spec can tell
    assert spec_revision(seen, ours) == "plugin-rev"
    assert spec_revision(dsd(), ours) == "plugin-rev"  # an older operator writes no desiredRevision


def test_a_post_switch_check_with_too_few_requests_reads_not_judged() -> None:
    obj = dsd("Completed", activeColor="green", activeRevision="r2")
    obj["status"]["rollout"]["analysis"] = {
        "stage": "PostVerifying", "requests": 9, "errors": 9, "errorRate": 1.0,
        "message": "9 server error(s) in 9 request(s) on green: not judged until 10 requests have come"}
    text = describe_deployment(obj, {"blue": None, "green": None}, [], desired_revision="r2", now=NOW)
    assert "Verification (PostVerifying): not judged, 9 request(s), 9 error(s)" in text


def test_env_hands_out_only_the_keys_token_in_force() -> None:
    from deepseek_operator.tokens import token_sha256

    current, pending, revoked = "eyJ.current", "eyJ.pending", "eyJ.revoked"
    held = {"type": "Ready", "status": "False", "reason": "TokenLimitReached",
            "message": "32 tokens of this key are out"}
    assert stale_token_reason({"tokenSHA256": token_sha256(current)}, current) is None
    # a rotation under way: the Secret already holds the token status records as pending
    assert stale_token_reason({"tokenSHA256": token_sha256(current),
                               "pendingToken": {"tokenSHA256": token_sha256(pending)}}, pending) is None
    # at the bound, the current token revoked and not replaced: status has no token, the Secret keeps the old one
    reason = stale_token_reason({"conditions": [held]}, revoked)
    assert reason is not None and "no token in force" in reason and "TokenLimitReached" in reason
    assert revoked not in reason
    altered = stale_token_reason({"tokenSHA256": token_sha256(current)}, revoked)
    assert altered is not None and "not the key's current one" in altered
