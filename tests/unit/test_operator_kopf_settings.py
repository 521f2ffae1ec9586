"""kopf's diff base is built only for kinds whose handlers use it; the start-up listing is paged and per-object event
workers end soon (pure: no API server involved)."""

from __future__ import annotations

import json

import kopf
from deepseek_operator.kopf_settings import EVENT_WORKER_IDLE_TIMEOUT, DiffBaseStorage, build_kopf_settings
from deepseek_operator.kube import LIST_PAGE_SIZE
from deepseek_operator.settings import OperatorSettings


def body(kind: str, stored: dict | None = None) -> kopf.Body:
    annotations = {"deepseek.ai/last-handled-configuration": json.dumps(stored)} if stored is not None else {}
    return kopf.Body({"apiVersion": "deepseek.ai/v1alpha1", "kind": kind,
                      "metadata": {"name": "a", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                                   "annotations": annotations},
                      "spec": {"replicas": 2}, "status": {"phase": "Ready"}})


def test_the_operator_uses_the_storage_under_its_own_annotation():
    storage = build_kopf_settings(OperatorSettings()).persistence.diffbase_storage
    assert isinstance(storage, DiffBaseStorage)
    assert storage.fetch(body=body("DeepSeekDeployment", {"spec": {"replicas": 1}})) == {"spec": {"replicas": 1}}


def test_apikey_events_build_and_read_no_diff_base():
    storage = DiffBaseStorage(prefix="deepseek.ai", key="last-handled-configuration")
    assert storage.build(body=body("ApiKey")) is None
    assert storage.fetch(body=body("ApiKey", {"spec": {"replicas": 1}})) is None


def test_deployments_keep_kopfs_diff_base():
    storage = DiffBaseStorage(prefix="deepseek.ai", key="last-handled-configuration")
    reference = kopf.AnnotationsDiffBaseStorage(prefix="deepseek.ai", key="last-handled-configuration")
    deployment = body("DeepSeekDeployment", {"spec": {"replicas": 1}})
    assert storage.build(body=deployment) == reference.build(body=deployment)
    assert storage.build(body=deployment)["spec"] == {"replicas": 2}
    assert storage.fetch(body=deployment) == reference.fetch(body=deployment) == {"spec": {"replicas": 1}}
    # A listed object without a kind (kopf fills it in; if not) is treated as kopf would.
    unnamed = kopf.Body({k: v for k, v in dict(deployment).items() if k != "kind"})
    assert storage.build(body=unnamed) == reference.build(body=unnamed)


def test_the_start_up_listing_is_paged_and_idle_event_workers_end_within_a_second():
    # kopf's defaults (one LIST response for every object; a worker per object alive 5 s after its last event) held
    # ten thousand listed ApiKeys and their workers at once after a restart.
    settings = build_kopf_settings(OperatorSettings())
    assert settings.watching.chunk_size == LIST_PAGE_SIZE == 500
    assert settings.queueing.idle_timeout == EVENT_WORKER_IDLE_TIMEOUT <= 1.0


def test_rollout_annotations_are_part_of_a_deployments_essence():
    # kopf leaves every annotation under its storage prefix out of the essence it diffs: the diff base drops a prefix
    # with a kopf marker (`deepseek.ai/kopf-managed`), the progress storage clears the whole prefix. Without keeping
    # them, setting deepseek.ai/promote, abort or retry fired no update handler ("the essence is the same") and
    # waited for the next periodic look (up to the 30 s stable interval).
    persistence = build_kopf_settings(OperatorSettings()).persistence

    def essence(obj: kopf.Body) -> dict:
        # as kopf's processing does it: build, then clear the progress storage's fields
        return persistence.progress_storage.clear(essence=persistence.diffbase_storage.build(body=obj))

    deployment = body("DeepSeekDeployment", {"spec": {"replicas": 2}})
    deployment["metadata"]["annotations"].update({"deepseek.ai/kopf-managed": "yes", "deepseek.ai/other": "x"})
    before = essence(deployment)
    # The rest of kopf's and other operators' storage under the prefix stays out, as before.
    assert "annotations" not in (before.get("metadata") or {})
    for name in ("deepseek.ai/promote", "deepseek.ai/abort", "deepseek.ai/retry"):
        annotated = kopf.Body({**dict(deployment), "metadata": {
            **deployment["metadata"], "annotations": {**deployment["metadata"]["annotations"], name: "abc123"}}})
        after = essence(annotated)
        assert after != before, name
        assert after["metadata"]["annotations"] == {name: "abc123"}
