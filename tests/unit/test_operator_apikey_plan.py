"""Decisions of the ApiKey reconcile, from snapshots (no cluster)."""

import pytest
from deepseek_operator.apikey_plan import (
    TOKEN_FIELDS,
    TOKENS_PER_KEY,
    IssuerView,
    apikey_conditions,
    build_grant,
    current_binding,
    issue_event,
    live_token_expiry_by_kid,
    next_due,
    plan_apikey,
    promote_pending,
    resolve_pending,
    with_pending,
)
from deepseek_operator.apikey_reconciler import SECRET_WRITE_MAX_BACKOFF, secret_write_failed, write_landed_nowhere
from deepseek_operator.auth_config import Limits
from deepseek_operator.durations import format_timestamp as ts
from deepseek_operator.durations import parse_timestamp
from deepseek_operator.kube import KubeError
from deepseek_operator.signing_keys import signing_key_from_seed
from deepseek_operator.tokens import sign_token, token_sha256

NOW = 1_800_000_000
KEY = signing_key_from_seed(b"\x01" * 32, created_at=0, sign_from=0)
OTHER = signing_key_from_seed(b"\x02" * 32, created_at=0, sign_from=0)


def issuer(**changes) -> IssuerView:
    values = dict(deployment="chat", issuer="deepseek-operator/ns/chat", audience="ns/chat",
                  base_url="http://chat.ns.svc:8000/v1", signing_key=KEY, published_kids=frozenset({KEY.kid}),
                  default_scopes=("model:predict",), default_limits=Limits(10, 20), limits_entry=None)
    values.update(changes)
    return IssuerView(**values)


def apikey(status=None, **spec) -> dict:
    base = {"deploymentRef": {"name": "chat"}, "subject": "alice", "environment": "dev", "duration": "30s",
            "renewBefore": "15s", "gracePeriod": "10s", "revoked": False}
    base.update(spec)
    return {"apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "alice", "namespace": "ns", "uid": "uid-1", "generation": 1},
            "spec": base, "status": status or {}}


def issued(key: dict, *, at: int = NOW, token_id: str = "tok-1") -> tuple[dict, str]:
    """A key whose token `token_id` was issued at `at`; returns (apikey with that status, token)."""
    grant = build_grant(key, issuer(), token_id=token_id, now=at)
    token = sign_token(grant, KEY)
    status = with_pending(key["status"], grant=grant, token=token, signing_key_id=KEY.kid, reason="Initial",
                          binding=current_binding(key, issuer()), previous_revoke_at=None)
    return {**key, "status": promote_pending(status, 15)}, token


def plan(key, token, *, now=NOW, exists=None, current=True, view="default"):
    return plan_apikey(key, secret_exists=token is not None if exists is None else exists, secret_token=token,
                       secret_current=current, issuer=issuer() if view == "default" else view, now=now)


def test_new_key_gets_a_first_token():
    result = plan(apikey(), None)
    assert result.issue_reason == "Initial" and result.revoke == {}


def test_settled_key_needs_nothing_and_comes_back_at_renewal_time():
    key, token = issued(apikey())
    result = plan(key, token, now=NOW + 5)
    assert result.issue_reason is None and result.revoke == {} and not result.repair_secret
    assert result.status["renewalTime"] == ts(NOW + 15)
    assert next_due(result.status, ready=True, revoked=False, now=NOW + 5, retry_interval=5) == NOW + 15


def test_renewal_keeps_the_old_token_for_its_grace_period_then_revokes_it():
    key, token = issued(apikey())
    result = plan(key, token, now=NOW + 15)
    assert result.issue_reason == "Renewal" and result.revoke == {}
    assert result.previous_revoke_at == NOW + 25
    grant = build_grant(key, issuer(), token_id="tok-2", now=NOW + 15)
    new_token = sign_token(grant, KEY)
    rotated = promote_pending(with_pending(result.status, grant=grant, token=new_token, signing_key_id=KEY.kid,
                                           reason="Renewal", binding=current_binding(key, issuer()),
                                           previous_revoke_at=result.previous_revoke_at), 15)
    assert rotated["tokenId"] == "tok-2" and rotated["revision"] == 2
    assert rotated["previousTokens"] == [{"tokenId": "tok-1", "signingKeyId": KEY.kid, "expiresAt": ts(NOW + 30),
                                          "revokeAt": ts(NOW + 25), "bindingHash": key["status"]["bindingHash"],
                                          "tokenScopes": ["model:predict"]}]
    assert next_due(rotated, ready=True, revoked=False, now=NOW + 15, retry_interval=5) == NOW + 25
    after_grace = plan({**key, "status": rotated}, new_token, now=NOW + 25)
    assert after_grace.revoke == {"tok-1": NOW + 30} and after_grace.issue_reason is None
    assert "previousTokens" not in after_grace.status
    assert [e.reason for e in after_grace.events] == ["Revoked"]


def test_zero_grace_revokes_the_old_token_at_once():
    key, token = issued(apikey(gracePeriod="0s"))
    result = plan(key, token, now=NOW + 15)
    assert result.issue_reason == "Renewal" and result.revoke == {"tok-1": NOW + 30}
    assert result.previous_revoke_at is None


def test_a_shortened_duration_bounds_the_token_already_issued():
    key, token = issued(apikey())  # 30s, renewed 15s before it expires
    shorter = {**key, "spec": {**key["spec"], "duration": "20s", "renewBefore": "5s", "gracePeriod": "5s"}}
    settled = plan(shorter, token, now=NOW + 10)
    assert settled.issue_reason is None and settled.status["renewalTime"] == ts(NOW + 15)
    assert next_due(settled.status, ready=True, revoked=False, now=NOW + 10, retry_interval=5) == NOW + 15
    renewed = plan(shorter, token, now=NOW + 15)
    assert renewed.issue_reason == "Renewal" and renewed.previous_revoke_at == NOW + 20
    # A longer duration changes nothing for the token already issued (it keeps its own expiry).
    longer = {**key, "spec": {**key["spec"], "duration": "300s", "renewBefore": "15s"}}
    assert plan(longer, token, now=NOW + 10).status["renewalTime"] == ts(NOW + 15)


@pytest.mark.parametrize(("secret_token", "reason"), [(None, "SecretMissing"), ("x.y.z", "SecretAltered")])
def test_lost_or_altered_token_is_revoked_and_replaced(secret_token, reason):
    key, _ = issued(apikey())
    result = plan(key, secret_token, now=NOW + 1)
    assert result.issue_reason == reason and result.revoke == {"tok-1": NOW + 30}


def _with(key: dict, **spec) -> dict:
    return {**key, "spec": {**key["spec"], **spec}}


def test_widened_scopes_reissue_and_keep_the_old_token_for_its_grace_period_then_revoke_it():
    key, token = issued(apikey(scopes=["model:predict"]))
    wider = _with(key, scopes=["model:predict", "history:read"])
    result = plan(wider, token, now=NOW + 1)
    assert result.issue_reason == "ScopesWidened"
    assert result.revoke == {}, "a widening revoked the old token at once"
    assert result.previous_revoke_at == NOW + 11  # gracePeriod 10s
    event = issue_event(result.issue_reason, "tok-2", ts(NOW + 31), "alice-apikey", result.issue_detail)
    assert event.reason == "Rotated"
    assert f"(ScopesWidened: scopes widened from model:predict to history:read, model:predict; the old token keeps " \
           f"working until {ts(NOW + 11)})" in event.message
    widened, new_token = _issue_as_planned(wider, result, token_id="tok-2", at=NOW + 1)
    assert widened["status"]["tokenScopes"] == ["history:read", "model:predict"]
    assert widened["status"]["previousTokens"] == [{"tokenId": "tok-1", "signingKeyId": KEY.kid,
                                                    "expiresAt": ts(NOW + 30), "revokeAt": ts(NOW + 11),
                                                    "bindingHash": key["status"]["bindingHash"],
                                                    "tokenScopes": ["model:predict"]}]
    assert plan(widened, new_token, now=NOW + 2).issue_reason is None, "the wider token is issued once"
    after_grace = plan(widened, new_token, now=NOW + 11)
    assert after_grace.revoke == {"tok-1": NOW + 30} and after_grace.issue_reason is None


def test_widening_never_keeps_the_old_token_past_its_expiry():
    key, token = issued(apikey(scopes=["model:predict"], gracePeriod="15s"))
    result = plan(_with(key, scopes=["model:predict", "history:read"]), token, now=NOW + 20)
    assert result.issue_reason == "ScopesWidened" and result.previous_revoke_at == NOW + 30


@pytest.mark.parametrize(("before", "after", "removed"), [
    (["model:predict", "history:read"], ["model:predict"], "history:read"),
    (["model:predict"], ["history:read"], "model:predict"),  # one removed, another added
])
def test_narrowed_scopes_revoke_the_old_token_at_once_and_say_which_scope_went(before, after, removed):
    key, token = issued(apikey(scopes=before))
    result = plan(_with(key, scopes=after), token, now=NOW + 1)
    assert result.issue_reason == "BindingChanged" and result.revoke == {"tok-1": NOW + 30}
    assert result.previous_revoke_at is None
    message = issue_event(result.issue_reason, "tok-2", ts(NOW + 31), "alice-apikey", result.issue_detail).message
    assert f"(BindingChanged: scopes changed from {', '.join(sorted(before))} to {', '.join(sorted(after))} " \
           f"({removed} removed); the old token is revoked)" in message


@pytest.mark.parametrize("other", [{"environment": "prod"}, {"subject": "mallory"}])
def test_widened_scopes_with_another_environment_or_subject_revoke_the_old_token_at_once(other):
    key, token = issued(apikey(scopes=["model:predict"]))
    wider = _with(key, scopes=["model:predict", "history:read"])
    assert plan(wider, token, now=NOW + 1).issue_reason == "ScopesWidened"  # the same widening alone keeps grace
    result = plan(_with(wider, **other), token, now=NOW + 1)
    assert result.issue_reason == "BindingChanged" and result.revoke == {"tok-1": NOW + 30}
    assert result.previous_revoke_at is None


def test_a_default_scope_added_on_the_deployment_widens_the_keys_without_their_own_scopes():
    key, token = issued(apikey())  # no spec.scopes: the deployment's defaults, model:predict
    wider_defaults = issuer(default_scopes=("model:predict", "history:read"))
    result = plan(key, token, now=NOW + 1, view=wider_defaults)
    assert result.issue_reason == "ScopesWidened" and result.revoke == {} and result.previous_revoke_at == NOW + 11
    assert build_grant(key, wider_defaults, token_id="tok-2", now=NOW + 1).scopes == ("history:read",
                                                                                       "model:predict")
    # A key with scopes of its own does not hold the defaults: nothing to issue.
    own, own_token = issued(apikey(scopes=["model:predict"]))
    assert plan(own, own_token, now=NOW + 1, view=wider_defaults).issue_reason is None
    # A default scope removed narrows those keys: revoked at once.
    narrower = plan(key, token, now=NOW + 1, view=issuer(default_scopes=("history:read",)))
    assert narrower.issue_reason == "BindingChanged" and narrower.revoke == {"tok-1": NOW + 30}


def test_zero_grace_widening_revokes_the_old_token_at_once():
    key, token = issued(apikey(scopes=["model:predict"], gracePeriod="0s"))
    result = plan(_with(key, scopes=["model:predict", "history:read"]), token, now=NOW + 1)
    assert result.issue_reason == "ScopesWidened"
    assert result.revoke == {"tok-1": NOW + 30} and result.previous_revoke_at is None
    assert "the old token is revoked, gracePeriod being 0" in result.issue_detail


def test_narrowing_during_a_widenings_grace_period_revokes_both_tokens():
    key, token = issued(apikey(scopes=["model:predict"]))
    wider = _with(key, scopes=["model:predict", "history:read"])
    widened, new_token = _issue_as_planned(wider, plan(wider, token, now=NOW + 1), token_id="tok-2", at=NOW + 1)
    result = plan(_with(widened, scopes=["history:read"]), new_token, now=NOW + 2)
    assert result.issue_reason == "BindingChanged"
    assert result.revoke == {"tok-2": NOW + 31, "tok-1": NOW + 30}, "model:predict still works with a token"
    assert "previousTokens" not in result.status


def test_a_binding_change_revokes_the_tokens_in_their_grace_period_too():
    key, token = issued(apikey())
    renewal = plan(key, token, now=NOW + 15)
    renewed, new_token = _issue_as_planned(key, renewal, token_id="tok-2", at=NOW + 15)
    assert [p["tokenId"] for p in renewed["status"]["previousTokens"]] == ["tok-1"]  # in grace until NOW + 25
    other = {**renewed, "spec": {**renewed["spec"], "subject": "mallory"}}
    result = plan(other, new_token, now=NOW + 16)
    assert result.issue_reason == "BindingChanged"
    assert result.revoke == {"tok-2": NOW + 45, "tok-1": NOW + 30}, "a token of the old subject still works"
    assert "previousTokens" not in result.status
    assert [e.reason for e in result.events] == ["Revoked"] and "tok-1" in result.events[0].message


@pytest.mark.parametrize(("secret_token", "reason"), [(None, "SecretMissing"), ("x.y.z", "SecretAltered")])
@pytest.mark.parametrize("change", [{"subject": "mallory"}, {"scopes": ["history:read"]}])
def test_a_binding_change_seen_with_a_lost_or_altered_secret_still_revokes_the_tokens_in_their_grace_period(
        secret_token, reason, change):
    key, token = issued(apikey(scopes=["model:predict", "history:read"]))
    renewed, _ = _issue_as_planned(key, plan(key, token, now=NOW + 15), token_id="tok-2", at=NOW + 15)
    assert [p["tokenId"] for p in renewed["status"]["previousTokens"]] == ["tok-1"]  # in grace until NOW + 25
    result = plan(_with(renewed, **change), secret_token, now=NOW + 16)
    assert result.issue_reason == reason
    assert result.revoke == {"tok-2": NOW + 45, "tok-1": NOW + 30}, "a token of the old binding still works"
    assert "previousTokens" not in result.status
    assert [e.reason for e in result.events] == ["Revoked"] and "tok-1" in result.events[0].message
    # Unable to sign the replacement yet: the old binding's tokens go all the same.
    unsigned = plan(_with(renewed, **change), secret_token, now=NOW + 16, view=issuer(signing_key=None))
    assert unsigned.revoke == {"tok-2": NOW + 45, "tok-1": NOW + 30}
    assert "previousTokens" not in unsigned.status and "tokenId" not in unsigned.status


def test_scopes_widened_with_a_lost_secret_keep_the_narrower_tokens_grace_period():
    key, token = issued(apikey(scopes=["model:predict"]))
    renewed, _ = _issue_as_planned(key, plan(key, token, now=NOW + 15), token_id="tok-2", at=NOW + 15)
    result = plan(_with(renewed, scopes=["model:predict", "history:read"]), None, now=NOW + 16)
    assert result.issue_reason == "SecretMissing" and result.revoke == {"tok-2": NOW + 45}
    assert [p["tokenId"] for p in result.status["previousTokens"]] == ["tok-1"]


def _after_a_refused_secret_write(key: dict, *, now: int) -> dict:
    """The key as the reconcile leaves it when its Secret is gone and the replacement cannot be written (a quota, an
    admission policy): the replaced token revoked and no longer current, the tokens in grace kept."""
    lost = plan(key, None, now=now)
    assert lost.issue_reason == "SecretMissing" and key["status"]["tokenId"] in lost.revoke
    status = {name: value for name, value in lost.status.items() if name not in TOKEN_FIELDS}
    assert status["previousTokens"], "the token in its grace period is kept"
    return {**key, "status": status}


@pytest.mark.parametrize("change", [{"scopes": ["model:predict"]}, {"subject": "mallory"},
                                    {"environment": "prod"}])
def test_a_binding_change_after_a_refused_secret_write_still_revokes_the_tokens_in_their_grace_period(change):
    key, token = issued(apikey(scopes=["model:predict", "history:read"]))
    renewed, _ = _issue_as_planned(key, plan(key, token, now=NOW + 15), token_id="tok-2", at=NOW + 15)
    assert [p["tokenId"] for p in renewed["status"]["previousTokens"]] == ["tok-1"]  # in grace until NOW + 25
    blocked = _after_a_refused_secret_write(renewed, now=NOW + 16)
    # With no current token there is no binding to compare with; each token in grace carries its own.
    result = plan(_with(blocked, **change), None, now=NOW + 17)
    assert result.issue_reason == "Initial"
    assert result.revoke == {"tok-1": NOW + 30}, "a token of the old binding kept its grace period"
    assert "previousTokens" not in result.status
    assert [e.reason for e in result.events] == ["Revoked"] and "tok-1" in result.events[0].message
    # Unable to sign yet: it goes all the same.
    assert plan(_with(blocked, **change), None, now=NOW + 17, view=issuer(signing_key=None)).revoke == {
        "tok-1": NOW + 30}


def test_tokens_in_grace_keep_it_after_a_refused_secret_write_when_scopes_are_only_added_or_nothing_changed():
    key, token = issued(apikey(scopes=["model:predict"]))
    renewed, _ = _issue_as_planned(key, plan(key, token, now=NOW + 15), token_id="tok-2", at=NOW + 15)
    blocked = _after_a_refused_secret_write(renewed, now=NOW + 16)
    for spec in ({}, {"scopes": ["model:predict", "history:read"]}):
        result = plan(_with(blocked, **spec), None, now=NOW + 17)
        assert result.issue_reason == "Initial" and result.revoke == {}
        assert [p["tokenId"] for p in result.status["previousTokens"]] == ["tok-1"]


def test_a_token_in_grace_recorded_by_an_older_operator_keeps_its_grace_period():
    key, token = issued(apikey(scopes=["model:predict", "history:read"]))
    renewed, _ = _issue_as_planned(key, plan(key, token, now=NOW + 15), token_id="tok-2", at=NOW + 15)
    blocked = _after_a_refused_secret_write(renewed, now=NOW + 16)
    older = [{name: item[name] for name in ("tokenId", "signingKeyId", "expiresAt", "revokeAt")}
             for item in blocked["status"]["previousTokens"]]
    result = plan(_with({**blocked, "status": {**blocked["status"], "previousTokens": older}},
                        scopes=["model:predict"]), None, now=NOW + 17)
    # What it binds is unknown: it is neither trusted nor judged, and ends with its grace period as before.
    assert result.revoke == {} and [p["tokenId"] for p in result.status["previousTokens"]] == ["tok-1"]


def test_token_of_an_unpublished_signing_key_is_replaced():
    key, token = issued(apikey())
    result = plan(key, token, now=NOW + 1, view=issuer(signing_key=OTHER, published_kids=frozenset({OTHER.kid})))
    assert result.issue_reason == "SigningKeyRetired"


def test_rate_limit_change_only_touches_the_limits_entry():
    key, token = issued(apikey(rateLimit={"requestsPerSecond": 2}))
    result = plan(key, token, now=NOW + 1)
    assert result.issue_reason is None and result.revoke == {}
    assert result.limits is not None and result.limits.limits == {"rps": 2, "burst": 20, "tpm": None,
                                                                   "parallel": None}
    stored = issuer(limits_entry=result.limits.limits)
    assert plan(key, token, now=NOW + 1, view=stored).limits is None
    same_as_default = apikey(rateLimit={"requestsPerSecond": 10, "burst": 20})
    assert plan(same_as_default, None, view=stored).limits.limits is None


def test_revoking_revokes_every_live_token_and_deletes_the_secret():
    key, token = issued(apikey())
    rotated = plan(key, token, now=NOW + 15)
    in_grace = dict(rotated.status, previousTokens=[{"tokenId": "old", "signingKeyId": KEY.kid,
                                                     "expiresAt": ts(NOW + 40), "revokeAt": ts(NOW + 30)}])
    revoked = {**key, "spec": {**key["spec"], "revoked": True}, "status": in_grace}
    result = plan(revoked, token, now=NOW + 16)
    assert result.revoke == {"tok-1": NOW + 30, "old": NOW + 40}
    assert result.delete_secret and result.issue_reason is None
    assert "tokenId" not in result.status and "previousTokens" not in result.status
    conditions = apikey_conditions(revoked, result.status, issuer(), now=NOW, deployment="chat")
    assert [(c.type, c.status, c.reason) for c in conditions] == [("Ready", False, "Revoked"),
                                                                  ("Revoked", True, "RevokedBySpec")]
    assert next_due(result.status, ready=False, revoked=True, now=NOW, retry_interval=5) is None


def test_unrevoking_issues_a_fresh_token():
    status = {"conditions": [{"type": "Revoked", "status": "True"}], "revision": 3}
    result = plan(apikey(status=status), None)
    assert result.issue_reason == "Unrevoked"


def test_pending_token_found_in_the_secret_becomes_current_without_a_new_issue():
    key, _ = issued(apikey())
    grant = build_grant(key, issuer(), token_id="tok-2", now=NOW + 15)
    new_token = sign_token(grant, KEY)
    crashed = with_pending(key["status"], grant=grant, token=new_token, signing_key_id=KEY.kid, reason="Renewal",
                           binding=current_binding(key, issuer()), previous_revoke_at=NOW + 25)
    status, revoke = resolve_pending(crashed, token_sha256(new_token), 15)
    assert revoke == {} and status["tokenId"] == "tok-2" and status["previousTokens"][0]["tokenId"] == "tok-1"
    result = plan({**key, "status": crashed}, new_token, now=NOW + 16)
    assert result.issue_reason is None and result.status["tokenId"] == "tok-2" and result.revoke == {}


def test_pending_token_never_written_is_revoked_and_the_step_redone():
    key, token = issued(apikey())
    grant = build_grant(key, issuer(), token_id="tok-2", now=NOW + 15)
    crashed = with_pending(key["status"], grant=grant, token=sign_token(grant, KEY), signing_key_id=KEY.kid,
                           reason="Renewal", binding=current_binding(key, issuer()), previous_revoke_at=NOW + 25)
    result = plan({**key, "status": crashed}, token, now=NOW + 16)
    assert result.revoke == {"tok-2": NOW + 45}
    assert result.issue_reason == "Renewal" and result.status["tokenId"] == "tok-1"
    assert "pendingToken" not in result.status


def test_missing_deployment_changes_nothing_and_says_so():
    key, token = issued(apikey())
    result = plan(key, token, view=None)
    assert result.issue_reason is None and result.revoke == {} and result.status == key["status"]
    ready = apikey_conditions(key, result.status, None, now=NOW, deployment="chat")[0]
    assert (ready.status, ready.reason) == (False, "DeploymentNotFound") and "'chat'" in ready.message
    assert next_due(result.status, ready=False, revoked=False, now=NOW, retry_interval=5) == NOW + 5


def test_no_published_key_means_not_ready_and_no_issue():
    result = plan(apikey(), None, view=issuer(signing_key=None))
    assert result.issue_reason is None
    ready = apikey_conditions(apikey(), result.status, issuer(signing_key=None), now=NOW, deployment="chat")[0]
    assert (ready.status, ready.reason) == (False, "IssuerNotReady")


def test_secret_with_the_right_token_but_wrong_fields_is_repaired_without_a_new_token():
    key, token = issued(apikey())
    result = plan(key, token, now=NOW + 1, current=False)
    assert result.repair_secret and result.issue_reason is None


def test_live_tokens_by_signing_key_cover_current_pending_and_grace():
    key, _ = issued(apikey())
    status = dict(key["status"], previousTokens=[{"tokenId": "old", "signingKeyId": OTHER.kid,
                                                  "expiresAt": ts(NOW + 90), "revokeAt": ts(NOW + 5)}])
    assert live_token_expiry_by_kid([{"status": status}], NOW) == {KEY.kid: NOW + 30, OTHER.kid: NOW + 90}
    assert live_token_expiry_by_kid([{"status": status}], NOW + 60) == {OTHER.kid: NOW + 90}


def test_an_unrecorded_token_of_ours_replaced_in_the_secret_is_revoked_as_well():
    key, _ = issued(apikey())
    stray_grant = build_grant(key, issuer(), token_id="stray", now=NOW)
    stray = sign_token(stray_grant, KEY)
    claims = {"jti": "stray", "exp": NOW + 30, "kid": KEY.kid}
    result = plan_apikey(key, secret_exists=True, secret_token=stray, secret_current=True, issuer=issuer(),
                         now=NOW + 1, secret_claims=claims)
    assert result.issue_reason == "SecretAltered"
    assert result.revoke == {"tok-1": NOW + 30, "stray": NOW + 30}


def test_a_first_token_found_in_the_secret_is_adopted_not_reissued():
    key = apikey()
    grant = build_grant(key, issuer(), token_id="found", now=NOW)
    token = sign_token(grant, KEY)
    claims = {"jti": "found", "exp": NOW + 30, "iat": NOW, "kid": KEY.kid, "sub": "alice",
              "scope": ["model:predict"], "env": "dev", "aud": "ns/chat"}
    result = plan_apikey(key, secret_exists=True, secret_token=token, secret_current=True, issuer=issuer(),
                         now=NOW + 1, secret_claims=claims)
    assert result.issue_reason is None and result.revoke == {}
    assert result.status["tokenId"] == "found" and result.status["revision"] == 1
    assert result.status["tokenScopes"] == ["model:predict"]  # so that adding a scope later keeps its grace


@pytest.mark.parametrize("problem", ["ConfigMap ns/chat-auth does not exist",
                                     "ConfigMap ns/chat-auth cannot be read: jwks.json is missing"])
def test_unknown_auth_configmap_neither_rotates_nor_revokes_and_says_so(problem):
    key, token = issued(apikey())
    # What the issuer can tell while its ConfigMap is gone or unreadable: nothing is known to be published.
    unknown = issuer(signing_key=None, published_kids=frozenset(), auth_unknown=problem)
    result = plan(key, token, now=NOW + 5, view=unknown)
    assert result.revoke == {}, f"an unknown auth state revoked {sorted(result.revoke)}"
    assert result.issue_reason is None and result.limits is None
    assert result.status == key["status"]
    ready = apikey_conditions(key, result.status, unknown, now=NOW + 5, deployment="chat")[0]
    assert (ready.status, ready.reason) == (None, "AuthConfigUnknown")
    assert problem in ready.message
    # Once it reads again, the same token is simply current.
    again = plan(key, token, now=NOW + 6)
    assert again.revoke == {} and again.issue_reason is None


def test_unknown_auth_configmap_still_honours_a_revocation_by_spec():
    key, token = issued(apikey(revoked=True))
    unknown = issuer(signing_key=None, published_kids=frozenset(), auth_unknown="ConfigMap ns/chat-auth does not "
                                                                                "exist")
    result = plan(key, token, now=NOW + 5, view=unknown)
    assert result.revoke == {"tok-1": NOW + 30} and result.delete_secret


def test_refused_secret_writes_back_off_exponentially_and_never_quote_a_token():
    error = KubeError(422, "Invalid", 'Secret "alice-apikey" is invalid: data: Forbidden: field is immutable; '
                      "was eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln", "PUT", "/api/v1/namespaces/ns/secrets/a")
    first = secret_write_failed(None, error, secret_name="alice-apikey", now=NOW, retry_interval=5)
    second = secret_write_failed(first, error, secret_name="alice-apikey", now=NOW + 5, retry_interval=5)
    assert (first.retry_at, second.retry_at) == (NOW + 5, NOW + 15)
    assert "immutable" in first.message and "alice-apikey" in first.message and "eyJ" not in first.message
    failure = first
    for _ in range(20):
        failure = secret_write_failed(failure, error, secret_name="alice-apikey", now=NOW, retry_interval=5)
    assert failure.retry_at == NOW + SECRET_WRITE_MAX_BACKOFF
    assert write_landed_nowhere(error) and write_landed_nowhere(KubeError(403, "Forbidden", "quota", "POST", "/"))
    assert not write_landed_nowhere(KubeError(504, "Timeout", "may still be processing", "PUT", "/"))
    assert not write_landed_nowhere(TimeoutError("read timed out"))


def test_a_refused_secret_write_echoing_the_secrets_data_never_quotes_the_token():
    """A webhook or proxy may echo the request body: the Secret's data holds the token base64-encoded (`ZXlK...`)."""
    import base64

    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    encoded = base64.b64encode(token.encode()).decode()
    error = KubeError(400, "BadRequest", f'admission webhook "policy" denied the request: data.api-key: {encoded}, '
                      f'data.OPENAI_API_KEY: {encoded}', "PUT", "/api/v1/namespaces/ns/secrets/a")
    failure = secret_write_failed(None, error, secret_name="alice-apikey", now=NOW, retry_interval=5)
    assert encoded[:12] not in failure.message and "denied the request" in failure.message
    assert failure.message.count("<token>") == 2


def test_revoking_covers_a_token_just_past_its_exp_that_servers_still_accept():
    key, token = issued(apikey(revoked=True))
    result = plan(key, token, now=NOW + 30 + 10)  # 10 s past exp: within the servers' leeway
    assert result.revoke == {"tok-1": NOW + 30}, "a token servers still accept was not revoked"


def _renewed(key: dict, at: int) -> tuple[dict, str]:
    """`key`'s first token (tok-1, issued at NOW) renewed at `at`: tok-1 in its grace period, tok-2 current."""
    key, token = issued(key)
    result = plan(key, token, now=at)
    assert result.issue_reason == "Renewal"
    return _issue_as_planned(key, result, token_id="tok-2", at=at)


# gracePeriod equal to renewBefore: tok-1's grace period ends at its expiry, NOW + 120 (tok-2 expires at NOW + 220)
GRACE_TO_EXPIRY = {"duration": "120s", "renewBefore": "20s", "gracePeriod": "20s"}


def test_revoking_covers_a_token_in_grace_just_past_its_exp_that_servers_still_accept():
    renewed, new_token = _renewed(apikey(**GRACE_TO_EXPIRY), at=NOW + 100)
    result = plan(_with(renewed, revoked=True), new_token, now=NOW + 120 + 10)
    assert result.revoke == {"tok-1": NOW + 120, "tok-2": NOW + 220}, "a token servers still accept was not revoked"


@pytest.mark.parametrize("late", [0, 10, 29])
def test_a_grace_period_ending_at_the_tokens_expiry_ends_with_a_revocation(late):
    renewed, new_token = _renewed(apikey(**GRACE_TO_EXPIRY), at=NOW + 100)
    assert renewed["status"]["previousTokens"][0]["revokeAt"] == ts(NOW + 120)
    result = plan(renewed, new_token, now=NOW + 120 + late)  # servers accept tok-1 until NOW + 150
    assert result.revoke == {"tok-1": NOW + 120} and "previousTokens" not in result.status
    assert [e.reason for e in result.events] == ["Revoked"]


def test_a_token_no_server_accepts_any_more_is_dropped_without_a_revocation():
    renewed, new_token = _renewed(apikey(**GRACE_TO_EXPIRY), at=NOW + 100)
    result = plan(renewed, new_token, now=NOW + 120 + 30)
    assert result.revoke == {} and "previousTokens" not in result.status and not result.events


def test_a_binding_change_revokes_a_token_in_grace_just_past_its_exp():
    renewed, new_token = _renewed(apikey(duration="120s", renewBefore="60s", gracePeriod="10s"), at=NOW + 60)
    # tok-1 expires at NOW + 120 and was in grace until NOW + 70; an operator that was down finds it at NOW + 130.
    result = plan(_with(renewed, subject="mallory"), new_token, now=NOW + 130)
    assert result.issue_reason == "BindingChanged"
    assert result.revoke == {"tok-1": NOW + 120, "tok-2": NOW + 180}, "a token of the old subject still works"


def test_an_expired_token_replaced_while_servers_still_accept_it_is_revoked():
    key, token = issued(apikey())
    result = plan(_with(key, subject="mallory"), token, now=NOW + 30 + 5)
    assert result.issue_reason == "Expired" and result.revoke == {"tok-1": NOW + 30}


def test_a_current_token_in_the_revoked_list_is_replaced_with_a_warning():
    key, token = issued(apikey())
    result = plan(key, token, now=NOW + 2, view=issuer(revoked={"tok-1": NOW + 30}))
    assert result.issue_reason == "TokenRevoked" and result.previous_revoke_at is None
    event = issue_event(result.issue_reason, "tok-2", ts(NOW + 32), "alice-apikey", result.issue_detail)
    assert event.type == "Warning" and "token tok-1 was found in the deployment's revoked list" in event.message
    # A revoked token in its grace period only ends that grace period early.
    renewed, new_token = _renewed(apikey(**GRACE_TO_EXPIRY), at=NOW + 100)
    assert plan(renewed, new_token, now=NOW + 101, view=issuer(revoked={"tok-1": NOW + 120})).issue_reason is None


def _annotated(key: dict, value: str) -> dict:
    return {**key, "metadata": {**key["metadata"], "annotations": {"deepseek.ai/rotate": value}}}


def _issue_as_planned(key: dict, result, *, token_id: str, at: int) -> tuple[dict, str]:
    """The status the reconcile writes once the planned token is in the Secret."""
    grant = build_grant(key, issuer(), token_id=token_id, now=at)
    new_token = sign_token(grant, KEY)
    pending = with_pending(result.status, grant=grant, token=new_token, signing_key_id=KEY.kid,
                           reason=result.issue_reason, binding=current_binding(key, issuer()),
                           previous_revoke_at=result.previous_revoke_at, rotation_request=result.rotation_request)
    return {**key, "status": promote_pending(pending, 15)}, new_token


def test_rotate_annotation_rotates_once_per_value_with_the_grace_period():
    key, token = issued(apikey())
    asked = _annotated(key, "2026-11-30T07:00:00Z")
    result = plan(asked, token, now=NOW + 2)
    assert result.issue_reason == "Requested" and result.rotation_request == "2026-11-30T07:00:00Z"
    assert result.revoke == {} and result.previous_revoke_at == NOW + 12  # the old token keeps its grace
    rotated, new_token = _issue_as_planned(asked, result, token_id="tok-2", at=NOW + 2)
    assert rotated["status"]["rotationRequest"] == "2026-11-30T07:00:00Z"
    assert [p["tokenId"] for p in rotated["status"]["previousTokens"]] == ["tok-1"]
    # The same value again (every later reconcile): nothing more.
    again = plan(rotated, new_token, now=NOW + 3)
    assert again.issue_reason is None and again.rotation_request is None
    # A new value: one more rotation.
    assert plan(_annotated(rotated, "2026-11-30T07:05:00Z"), new_token, now=NOW + 4).issue_reason == "Requested"
    assert issue_event("Requested", "tok-2", ts(NOW + 32), "alice-apikey").reason == "Rotated"


def test_rotate_request_counts_as_done_only_when_its_token_reached_the_secret():
    key, token = issued(apikey())
    asked = _annotated(key, "now")
    result = plan(asked, token, now=NOW + 2)
    grant = build_grant(asked, issuer(), token_id="tok-2", now=NOW + 2)
    crashed = with_pending(result.status, grant=grant, token=sign_token(grant, KEY), signing_key_id=KEY.kid,
                           reason="Requested", binding=current_binding(asked, issuer()),
                           previous_revoke_at=result.previous_revoke_at, rotation_request="now")
    # The pending token never reached the Secret: it is revoked and the rotation is asked for again.
    redo = plan({**asked, "status": crashed}, token, now=NOW + 3)
    assert redo.revoke == {"tok-2": NOW + 32} and redo.issue_reason == "Requested"
    assert "rotationRequest" not in redo.status


def test_rotate_annotation_on_a_revoked_key_issues_nothing():
    key, token = issued(apikey())
    result = plan(_annotated({**key, "spec": {**key["spec"], "revoked": True}}, "now"), token, now=NOW + 2)
    assert result.issue_reason is None and result.rotation_request is None and result.delete_secret


def _rotated_until_held(key: dict, token: str, *, every: int = 60) -> tuple[dict, str, int]:
    """Rotate `key` by annotation every `every` s until a rotation is held back; returns (key, token, that time)."""
    for n in range(1, TOKENS_PER_KEY + 2):
        asked = _annotated(key, f"request-{n}")
        result = plan(asked, token, now=NOW + n * every)
        if result.issue_reason is None:
            return {**asked, "status": result.status}, token, NOW + n * every
        assert result.issue_reason == "Requested"
        key, token = _issue_as_planned(asked, result, token_id=f"tok-{n + 1}", at=NOW + n * every)
    raise AssertionError(f"{TOKENS_PER_KEY + 1} rotations were never held back")


def test_a_key_has_at_most_a_bounded_number_of_tokens_out_and_a_rotation_past_it_waits_for_the_oldest():
    key, token = issued(apikey(duration="1h", renewBefore="30m"))
    held, token, at = _rotated_until_held(key, token)
    assert len(held["status"]["recentTokens"]) == TOKENS_PER_KEY  # the first token and 31 rotations
    result = plan(held, token, now=at)
    oldest_out = NOW + 3600 + 90  # tok-1's expiry, the servers' 30 s leeway and the 60 s margin of the revoked list
    assert (result.held_reason, result.held_until, result.revoke) == ("Requested", oldest_out, {})
    assert result.status["tokenId"] == f"tok-{TOKENS_PER_KEY}", "the current token stays current"
    ready = apikey_conditions(held, result.status, issuer(), now=at, deployment="chat",
                              held_reason=result.held_reason, held_until=result.held_until)[0]
    assert (ready.status, ready.reason) == (True, "RotationHeld")
    assert f"waits until {ts(oldest_out)}" in ready.message and f"{TOKENS_PER_KEY} tokens of this key" in ready.message
    renewal = int(parse_timestamp(result.status["renewalTime"]))
    assert next_due(result.status, ready=True, revoked=False, now=at, retry_interval=5,
                    held_until=result.held_until) == min(renewal, oldest_out)
    assert next_due({"renewalTime": ts(oldest_out + 60)}, ready=True, revoked=False, now=at, retry_interval=5,
                    held_until=result.held_until) == oldest_out
    # Once the oldest has aged out of the revoked list, the rotation asked for happens.
    later = plan(held, token, now=oldest_out)
    assert later.issue_reason in ("Requested", "Renewal") and later.held_reason is None
    assert len(later.status["recentTokens"]) == TOKENS_PER_KEY - 1


def test_a_renewal_held_back_is_looked_at_again_when_it_may_go_not_at_once():
    """A due renewal held back by the bound left renewalTime in the past, and next_due returned it: the key was
    reconciled again at once, over and over (two reads each), until the oldest token aged out."""
    key, token = issued(apikey(duration="1h", renewBefore="45m"))
    held, token, at = _rotated_until_held(key, token)
    # the rotation asked for is answered, and a reconcile with nothing due wrote the current token's renewal time
    settled = plan({**held, "metadata": {**held["metadata"], "annotations": {}}}, token, now=at)
    assert settled.issue_reason is None and settled.held_reason is None
    held = {**held, "metadata": {**held["metadata"], "annotations": {}}, "status": settled.status}
    when = int(parse_timestamp(held["status"]["renewalTime"])) + 10  # the renewal is 10 s overdue
    result = plan(held, token, now=when)
    assert result.held_reason == "Renewal" and result.held_until > when
    assert int(parse_timestamp(result.status["renewalTime"])) < when
    due = next_due(result.status, ready=True, revoked=False, now=when, retry_interval=5,
                   held_until=result.held_until)
    assert due == min(result.held_until, int(parse_timestamp(result.status["expiresAt"])))
    assert due > when


@pytest.mark.parametrize("reason", ["Requested", "Renewal"])
def test_a_rotation_held_back_with_no_grace_period_keeps_the_current_token(reason):
    # Renewed 45 min before expiry: before the token has lived half its hour, so the bound holds the renewal too.
    key, token = issued(apikey(duration="1h", renewBefore="45m", gracePeriod="0s"))
    held, token, at = _rotated_until_held(key, token)
    when = at if reason == "Requested" else int(parse_timestamp(held["status"]["expiresAt"])) - 2700
    result = plan(held, token, now=when)
    assert result.held_reason == reason and result.revoke == {}, "a token was revoked for a rotation held back"
    assert result.status["tokenId"] == f"tok-{TOKENS_PER_KEY}"


@pytest.mark.parametrize(("change", "secret"), [({}, None), ({"scopes": ["history:read"]}, "token")])
def test_a_lost_secret_or_a_removed_scope_past_the_bound_still_revokes_and_leaves_the_key_without_a_token(
        change, secret):
    key, token = issued(apikey(duration="1h", renewBefore="30m"))
    held, token, at = _rotated_until_held(key, token)
    result = plan(_with(held, **change), None if secret is None else token, now=at)
    assert result.issue_reason is None and result.held_reason in ("SecretMissing", "BindingChanged")
    assert f"tok-{TOKENS_PER_KEY}" in result.revoke, "the lost or narrowed token still works"
    assert "tokenId" not in result.status
    ready = apikey_conditions(held, result.status, issuer(), now=at, deployment="chat",
                              held_reason=result.held_reason, held_until=result.held_until)[0]
    assert (ready.status, ready.reason) == (False, "TokenLimitReached") and "no valid token" in ready.message
    assert next_due(result.status, ready=False, revoked=False, now=at, retry_interval=5,
                    held_until=result.held_until) == result.held_until


def test_revoking_and_unrevoking_a_key_does_not_reset_its_count_of_tokens_out():
    key, token = issued(apikey(duration="1h", renewBefore="30m"))
    held, token, at = _rotated_until_held(key, token)
    revoked = plan(_with(held, revoked=True), token, now=at)
    assert revoked.revoke and len(revoked.status["recentTokens"]) == TOKENS_PER_KEY
    again = plan({**_with(held, revoked=False), "status": revoked.status}, None, now=at + 1)
    assert again.issue_reason is None and again.held_reason == "Initial"


def _run_schedule(key: dict, token: str, *, seconds: int, asks_every: int | None = None) -> tuple[int, int]:
    """Reconcile `key` once a second for `seconds` (asking for a rotation every `asks_every` s if given); returns
    (the most tokens out at once, seconds without a valid token)."""
    most, lapsed, count = 0, 0, 1
    for t in range(NOW + 1, NOW + seconds):
        asked = _annotated(key, f"ask-{t // asks_every}") if asks_every else key
        result = plan(asked, token, now=t)
        if result.issue_reason:
            count += 1
            key, token = _issue_as_planned(asked, result, token_id=f"tok-{count}", at=t)
        else:
            key = {**asked, "status": result.status}
        status = key["status"]
        if not (status.get("tokenId") and int(parse_timestamp(status["expiresAt"])) > t):
            lapsed += 1
        most = max(most, len(status.get("recentTokens") or []))
    return most, lapsed


@pytest.mark.parametrize(("duration", "renew_before"), [("10s", "9s"), ("10s", "8s"), ("30s", "29s"), ("2m", "1m")])
def test_a_key_renewing_on_its_own_schedule_never_lapses_for_the_bound(duration, renew_before):
    key, token = issued(apikey(duration=duration, renewBefore=renew_before, gracePeriod="0s"))
    most, lapsed = _run_schedule(key, token, seconds=600)
    assert lapsed == 0, f"the key had no valid token for {lapsed} s"
    assert most <= TOKENS_PER_KEY + 20


def test_a_spec_renewing_every_second_or_rotation_requests_every_second_stay_near_the_bound():
    year = apikey(duration="8760h", renewBefore="8759h59m59s", gracePeriod="0s")
    key, token = issued(year)
    assert _run_schedule(key, token, seconds=300) == (TOKENS_PER_KEY, 0)
    key, token = issued(apikey(duration="1h", renewBefore="30m", gracePeriod="0s"))
    assert _run_schedule(key, token, seconds=300, asks_every=1) == (TOKENS_PER_KEY, 0)


def test_a_revoked_key_whose_deployment_is_gone_loses_its_secret_and_nothing_else():
    """spec.revoked deletes the key's Secret also while its deployment is missing (it was kept, token and all); an
    unrevoked key's Secret and every key's token bookkeeping are left as they are then."""
    key, token = issued(apikey())
    revoked = plan(_with(key, revoked=True), token, now=NOW + 5, view=None)
    assert revoked.delete_secret and revoked.revoke == {} and revoked.status == key["status"]
    assert not plan(key, token, now=NOW + 5, view=None).delete_secret
    assert not plan(_with(key, revoked=True), None, now=NOW + 5, view=None).delete_secret  # no Secret to delete
