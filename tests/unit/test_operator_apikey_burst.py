"""Pure parts of the ApiKey burst path: which keys take the first-issuance path, and how requests are counted."""

from __future__ import annotations

from deepseek_operator.apikey_reconciler import first_issuance
from deepseek_operator.kube import request_kind


def apikey(*, status: dict | None = None, revoked: bool = False, deleting: bool = False) -> dict:
    meta = {"name": "k", "namespace": "ns", **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    return {"metadata": meta, "spec": {"deploymentRef": {"name": "chat"}, "revoked": revoked},
            "status": status or {}}


def test_only_a_key_that_never_held_a_token_takes_the_first_issuance_path() -> None:
    assert first_issuance(apikey())
    assert first_issuance(apikey(status={"conditions": [{"type": "Ready", "status": "False"}]}))
    assert not first_issuance(apikey(status={"tokenId": "t1"}))
    assert not first_issuance(apikey(status={"pendingToken": {"tokenId": "t2"}}))  # a rotation to settle
    assert not first_issuance(apikey(revoked=True))
    assert not first_issuance(apikey(deleting=True))


def test_requests_are_counted_by_verb_and_resource_as_the_api_server_counts_them() -> None:
    assert request_kind("GET", "/api/v1/namespaces/ns/secrets/k-apikey") == "GET secrets"
    assert request_kind("GET", "/apis/deepseek.ai/v1alpha1/namespaces/ns/apikeys") == "LIST apikeys"
    assert request_kind("POST", "/api/v1/namespaces/ns/secrets") == "POST secrets"
    assert request_kind("PUT", "/apis/deepseek.ai/v1alpha1/namespaces/ns/apikeys/k/status") == "PUT apikeys/status"
    assert request_kind("PATCH", "/apis/deepseek.ai/v1alpha1/namespaces/ns/apikeys/k") == "PATCH apikeys"
    assert request_kind("GET", "/api/v1/namespaces/ns") == "GET namespaces"
    assert request_kind("POST", "/api/v1/namespaces") == "POST namespaces"


def test_new_keys_wait_once_each_in_their_deployments_queue_oldest_first() -> None:
    from deepseek_operator.runtime import PendingIssuances

    pending = PendingIssuances()
    for name in ("a", "b", "c"):
        pending.put("ns", "chat", name, {"metadata": {"name": name, "generation": 1}})
    pending.put("ns", "other", "x", {"metadata": {"name": "x"}})
    pending.put("ns", "chat", "a", {"metadata": {"name": "a", "generation": 2}})  # a later event of a queued key
    assert len(pending) == 4
    assert pending.pop("ns", "chat") == ("a", {"metadata": {"name": "a", "generation": 2}})  # newest object, same place
    pending.discard("ns", "b")  # superseded (deleted, or its next event runs a full reconcile)
    pending.put("ns", "other", "c", {"metadata": {"name": "c"}})  # c now names another deployment: moves there
    assert pending.pop("ns", "chat") is None
    assert [pending.pop("ns", "other"), pending.pop("ns", "other"), pending.pop("ns", "other")] == [
        ("x", {"metadata": {"name": "x"}}), ("c", {"metadata": {"name": "c"}}), None]
    assert len(pending) == 0
    pending.discard("ns", "never-queued")


def test_a_deferred_status_waits_for_new_keys_but_never_longer_than_its_bound() -> None:
    from deepseek_operator.runtime import STATUS_MAX_WAIT, status_write_delay

    assert status_write_delay(100.0, 100.0, issuances_waiting=0) == 0.0  # nothing waits: write it now
    assert status_write_delay(100.0, 101.0, issuances_waiting=300) == STATUS_MAX_WAIT - 1.0
    assert status_write_delay(100.0, 100.0 + STATUS_MAX_WAIT, issuances_waiting=300) == 0.0
    assert status_write_delay(100.0, 200.0, issuances_waiting=1) == 0.0  # a stream of new keys never stops it
    assert status_write_delay(100.0, 100.5, issuances_waiting=1, max_wait=2.0) == 1.5


def test_a_deferred_status_keeps_only_what_its_write_needs() -> None:
    from deepseek_operator.apikey_reconciler import status_target

    key = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey",
           "metadata": {"name": "k", "namespace": "ns", "uid": "u-1", "resourceVersion": "42", "generation": 1,
                        "labels": {"team": "a"}, "managedFields": [{"manager": "kubectl"}] * 3},
           "spec": {"deploymentRef": {"name": "chat"}, "subject": "alice"}}
    target = status_target(key)
    assert target == {"apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey",
                      "metadata": {"name": "k", "namespace": "ns", "uid": "u-1", "resourceVersion": "42"}}
    assert status_target(target) == target
