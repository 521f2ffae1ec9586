"""Pure pieces of keys at rest: when a key's Secret need not be read, the drift timer's budget, what a re-list of the
Secret watch reports, and which pool sent a request."""

from __future__ import annotations

from deepseek_operator.apikey_reconciler import drift_check_interval, secret_known_unchanged
from deepseek_operator.apikey_secret_watch import LABEL_SELECTOR, SecretVersion, changed_secrets, secret_version
from deepseek_operator.kube import request_pool
from deepseek_operator.names import apikey_secret_labels

STATUS = {"tokenId": "t1", "tokenSHA256": "ab", "secretName": "alice-apikey", "secretResourceVersion": "42"}


def test_a_secret_at_the_recorded_version_owned_by_the_key_is_known_unchanged():
    assert secret_known_unchanged(STATUS, "alice-apikey", "uid-1", SecretVersion("42", "uid-1", "alice"))


def test_anything_else_means_the_secret_is_read():
    seen = SecretVersion("42", "uid-1", "alice")
    assert not secret_known_unchanged(STATUS, "alice-apikey", "uid-1", None)  # unknown (or watch not in sync)
    assert not secret_known_unchanged(STATUS, "alice-apikey", "uid-1", SecretVersion("43", "uid-1", "alice"))
    assert not secret_known_unchanged(STATUS, "alice-apikey", "uid-2", seen)  # another key's Secret
    assert not secret_known_unchanged(STATUS, "other-apikey", "uid-1", seen)  # spec.secretName changed
    assert not secret_known_unchanged({**STATUS, "pendingToken": {"tokenId": "t2"}}, "alice-apikey", "uid-1", seen)
    without_version = {k: v for k, v in STATUS.items() if k != "secretResourceVersion"}
    assert not secret_known_unchanged(without_version, "alice-apikey", "uid-1", seen)  # written by an older operator
    without_token = {k: v for k, v in STATUS.items() if k != "tokenId"}
    assert not secret_known_unchanged(without_token, "alice-apikey", "uid-1", seen)


def test_the_drift_timer_is_a_rare_resync_with_the_watch_and_a_budget_without_it():
    common = {"resync_interval": 86400.0, "check_interval": 300.0, "checks_per_second": 2.0}
    assert drift_check_interval(watched=True, keys=10_000, **common) == 86400.0
    assert drift_check_interval(watched=False, keys=100, **common) == 300.0
    # 10,000 keys read every 300 s would be 33 reads/s: stretched to 2/s.
    assert drift_check_interval(watched=False, keys=10_000, **common) == 5000.0
    assert drift_check_interval(watched=True, keys=1_000_000, **common) == 500_000.0


def test_a_relisting_reports_changed_deleted_and_new_secrets_only():
    before = {"a": SecretVersion("1", "u1", "ka"), "b": SecretVersion("2", "u2", "kb"),
              "c": SecretVersion("3", "u3", "kc")}
    after = {"a": SecretVersion("1", "u1", "ka"), "b": SecretVersion("5", "u2", "kb"),
             "d": SecretVersion("6", "u4", "kd")}
    assert changed_secrets(before, after) == [
        ("b", before["b"], after["b"]), ("c", before["c"], None), ("d", after["d"], after["d"])]
    assert changed_secrets(before, dict(before)) == []


def test_a_secrets_owner_is_its_apikey_owner_reference():
    meta = {"resourceVersion": "9", "ownerReferences": [
        {"kind": "Deployment", "name": "x", "uid": "d"}, {"kind": "ApiKey", "name": "alice", "uid": "u1"}]}
    assert secret_version(meta) == SecretVersion("9", "u1", "alice")
    assert secret_version({"resourceVersion": "9"}) == SecretVersion("9", None, None)


def test_the_watch_selects_exactly_what_apikey_secrets_carry():
    labels = apikey_secret_labels("chat", "uid-1")
    for term in LABEL_SELECTOR.split(","):
        key, _, value = term.partition("=")
        assert key in labels and (not value or labels[key] == value), term


def test_requests_are_counted_by_the_pool_that_sent_them():
    assert request_pool("apikey_3") == "apikey"
    assert request_pool("issue_0") == "issue"
    assert request_pool("reconcile_12") == "reconcile"
    assert request_pool("secret-watch-all") == "secret-watch"
    assert request_pool("secret-watch-team_a") == "secret-watch"
    assert request_pool("MainThread") == "MainThread"


def test_a_secret_known_unchanged_plans_as_if_its_token_had_been_read():
    from test_operator_apikey_plan import NOW, apikey, issued, issuer, plan_apikey

    key, token = issued(apikey())
    sha = key["status"]["tokenSHA256"]

    def unread(at: int):
        return plan_apikey(key, secret_exists=True, secret_token=None, secret_current=True, issuer=issuer(), now=at,
                           secret_sha=sha)

    def read(at: int):
        return plan_apikey(key, secret_exists=True, secret_token=token, secret_current=True, issuer=issuer(), now=at)

    for at in (NOW + 5, NOW + 20):  # settled; renewal due
        assert unread(at) == read(at)
    assert unread(NOW + 5).issue_reason is None and unread(NOW + 20).issue_reason == "Renewal"
    # Without the token or its hash, the Secret counts as holding none.
    assert plan_apikey(key, secret_exists=True, secret_token=None, secret_current=True, issuer=issuer(),
                       now=NOW + 5).issue_reason == "SecretMissing"


def test_a_secret_that_loses_its_owner_reference_wakes_the_key_that_owned_it():
    from deepseek_operator.apikey_secret_watch import ApiKeySecretWatch

    calls = []
    watch = ApiKeySecretWatch(None, ["ns"], lambda *args: calls.append(args))
    owned = {"namespace": "ns", "name": "alice-apikey", "resourceVersion": "1",
             "ownerReferences": [{"kind": "ApiKey", "name": "alice", "uid": "u1"}]}
    watch._apply("ADDED", owned)
    watch._apply("MODIFIED", {"namespace": "ns", "name": "alice-apikey", "resourceVersion": "2"})
    # Pointed at another key: both hear of it.
    watch._apply("MODIFIED", {**owned, "resourceVersion": "3"})
    watch._apply("MODIFIED", {**owned, "resourceVersion": "4",
                              "ownerReferences": [{"kind": "ApiKey", "name": "bob", "uid": "u2"}]})
    assert calls == [("ns", "alice", "alice-apikey", "1"), ("ns", "alice", "alice-apikey", "2"),
                     ("ns", "alice", "alice-apikey", "3"), ("ns", "bob", "alice-apikey", "4"),
                     ("ns", "alice", "alice-apikey", "4")]
