import kopf
from deepseek_operator.handlers.apikey import needs_reconcile, observed_copy
from deepseek_operator.handlers.deployment import auth_spec_changed
from deepseek_operator.names import FINALIZER


def body(generation=1, observed=None, finalizers=(FINALIZER,), deleting=False, pending=False):
    meta = {"generation": generation, "finalizers": list(finalizers)}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {} if observed is None else {"observedGeneration": observed}
    if pending:
        status["pendingToken"] = {"tokenId": "x"}
    return {"metadata": meta, "status": status}


def test_new_and_changed_specs_are_reconciled_our_own_status_writes_are_not():
    assert needs_reconcile("ADDED", body(finalizers=()))
    assert needs_reconcile("MODIFIED", body(generation=2, observed=1))
    assert not needs_reconcile("MODIFIED", body(generation=2, observed=2))
    assert needs_reconcile("MODIFIED", body(generation=2, observed=2, pending=True))


def test_every_key_is_resumed_after_a_start_and_deletion_is_finalized_once():
    assert needs_reconcile(None, body(generation=3, observed=3))
    assert needs_reconcile("MODIFIED", body(observed=1, deleting=True))
    assert not needs_reconcile("MODIFIED", body(observed=1, deleting=True, finalizers=("other",)))
    assert not needs_reconcile("DELETED", body())


def test_a_new_rotate_annotation_value_is_reconciled_a_done_one_is_not():
    asked = body(generation=2, observed=2)
    asked["metadata"]["annotations"] = {"deepseek.ai/rotate": "2026-11-30T07:00:00Z"}
    assert needs_reconcile("MODIFIED", asked)
    asked["status"]["rotationRequest"] = "2026-11-30T07:00:00Z"
    assert not needs_reconcile("MODIFIED", asked)


def test_only_an_edit_of_spec_auth_wakes_the_keys_of_a_deployment():
    # kopf's update diff: (op, field path, old, new)
    assert not auth_spec_changed([("change", ("spec", "image"), "server:1", "server:2")])
    assert not auth_spec_changed([("change", ("spec", "replicas"), 1, 3),
                                  ("add", ("metadata", "labels", "a"), None, "b")])
    assert auth_spec_changed([("change", ("spec", "auth", "defaultScopes"), ["model:predict"],
                               ["model:predict", "history:read"])])
    assert auth_spec_changed([("add", ("spec", "auth"), None, {"defaultScopes": ["history:read"]})])
    assert auth_spec_changed([("change", ("spec",), {"image": "a"}, {"image": "a", "auth": {}})])
    assert not auth_spec_changed([("change", ("spec",), {"image": "a", "auth": {}}, {"image": "b", "auth": {}})])
    assert auth_spec_changed([("change", (), {"spec": {"auth": {"x": 1}}}, {"spec": {}})])
    assert not auth_spec_changed([])


def test_a_reconcile_gets_its_own_copy_of_the_event_object_without_managed_fields():
    raw = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "ApiKey",
           "metadata": {"name": "k", "namespace": "ns", "uid": "u", "resourceVersion": "9", "generation": 2,
                        "finalizers": [FINALIZER], "annotations": {"a": "b"}, "labels": {"team": "x"},
                        "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
           "spec": {"deploymentRef": {"name": "chat"}, "scopes": ["chat"]},
           "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}}
    copied = observed_copy(kopf.Body(raw))
    assert "managedFields" not in copied["metadata"]
    assert copied == {**raw, "metadata": {k: v for k, v in raw["metadata"].items() if k != "managedFields"}}
    copied["spec"]["scopes"].append("admin")
    copied["metadata"]["finalizers"].clear()
    copied["status"]["conditions"][0]["status"] = "False"
    assert raw["spec"]["scopes"] == ["chat"] and raw["metadata"]["finalizers"] == [FINALIZER]
    assert raw["status"]["conditions"][0]["status"] == "True"
    assert observed_copy({"spec": {}}) == {"spec": {}, "metadata": {}}
