from deepseek_operator.handlers.apikey import needs_reconcile
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
