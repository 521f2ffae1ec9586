"""A reconcile waiting for a DeepSeekDeployment (after an edit, say) makes the serving pass that holds it stop before
acting on what it decided from the older spec: the waiting reconcile then decides afresh.

The reconciles run in this process against the real API server (no operator process: nothing else reconciles the
namespace meanwhile); a failpoint holds the first pass between its decision and its action while the test edits the
deployment and starts the second reconcile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from conftest import Cluster, wait_for
from deepseek_operator import failpoints
from deepseek_operator.revision import compute_revision
from kubernetes import client, watch

pytestmark = pytest.mark.cluster

HOLD_S = 3.0


class Held(logging.Handler):
    """Sets `reached` when a failpoint starts holding a reconcile."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "holding it" in record.getMessage():
            self.reached.set()


def revisions_of_color_deployments(api_client: client.ApiClient, namespace: str, name: str) -> list[str]:
    apps = client.AppsV1Api(api_client)
    found = apps.list_namespaced_deployment(namespace, label_selector=f"deepseek.ai/deployment={name}").items
    return sorted((d.spec.template.metadata.labels or {}).get("deepseek.ai/revision", "") for d in found)


class RevisionsSeen(threading.Thread):
    """Every revision any version of the deployment's color Deployments ever carried (from a watch)."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str) -> None:
        super().__init__(daemon=True)
        self.seen: set[str] = set()
        self.stopped = threading.Event()
        self.started_watching = threading.Event()
        self._args = (client.AppsV1Api(api_client).list_namespaced_deployment, namespace)
        self._selector = f"deepseek.ai/deployment={name}"

    def run(self) -> None:
        stream = watch.Watch()
        list_deployments, namespace = self._args
        self.started_watching.set()
        try:
            for event in stream.stream(list_deployments, namespace, label_selector=self._selector,
                                       timeout_seconds=60):
                labels = event["object"].spec.template.metadata.labels or {}
                self.seen.add(labels.get("deepseek.ai/revision", ""))
                if self.stopped.is_set():
                    stream.stop()
        except Exception:  # the namespace going away at the end ends the stream
            if not self.stopped.is_set():
                raise


def test_a_pass_overtaken_by_an_edit_applies_nothing_of_the_older_spec(runtime, api_client, namespace,
                                                                       monkeypatch) -> None:
    world = Cluster(api_client, namespace)
    name = "overtaken"
    held = Held()
    logging.getLogger(failpoints.__name__).addHandler(held)
    revisions = RevisionsSeen(api_client, namespace, name)
    revisions.start()
    revisions.started_watching.wait(10)
    try:
        first = world.apply_deployment(name)
        older = compute_revision(first["spec"])
        # The first pass decides to start the older spec's revision, and is held right there.
        monkeypatch.setenv(failpoints.ENV, f"rollout-none={namespace}/{name}")
        monkeypatch.setenv(failpoints.SLEEP_ENV, str(HOLD_S))
        results: dict[str, Any] = {}
        first_pass = threading.Thread(target=lambda: results.update(
            first=runtime.deployments.reconcile(namespace, name)))
        first_pass.start()
        assert held.reached.wait(60), "the first pass never reached its decision"

        edited = world.custom.patch_namespaced_custom_object(
            "deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", name,
            {"spec": {"server": {"maxNewTokens": 77}}})
        newer = compute_revision(edited["spec"])
        assert newer != older
        second_pass = threading.Thread(target=lambda: results.update(
            second=runtime.deployments.reconcile(namespace, name)))
        second_pass.start()
        first_pass.join(60)
        second_pass.join(60)
        assert not first_pass.is_alive() and not second_pass.is_alive()
        assert results["first"].next_due is not None and results["second"].next_due is not None

        # Only the edited spec was acted on: no Deployment ever carried the older revision.
        assert revisions_of_color_deployments(api_client, namespace, name) == [newer]
        wait_for("the watch to see the newer revision", lambda: newer in revisions.seen, timeout=10)
        assert revisions.seen == {newer}
        status = world.deployment(name)["status"]
        assert status["observedGeneration"] == edited["metadata"]["generation"] == 2
        assert (status.get("rollout") or {}).get("revision") == newer
    finally:
        revisions.stopped.set()  # joined only after the namespace is gone: no further event may come to end it
        logging.getLogger(failpoints.__name__).removeHandler(held)


def test_a_pass_nobody_waits_for_goes_on_after_the_failpoint(runtime, api_client, namespace, monkeypatch) -> None:
    """The same hold with no edit and no second reconcile: the pass acts on its decision as before."""
    world = Cluster(api_client, namespace)
    name = "alone"
    created = world.apply_deployment(name)
    monkeypatch.setenv(failpoints.ENV, f"rollout-none={namespace}/{name}")
    monkeypatch.setenv(failpoints.SLEEP_ENV, "0.5")
    runtime.deployments.reconcile(namespace, name)
    revision = compute_revision(created["spec"])
    assert wait_for("the first revision's Deployment",
                    lambda: revisions_of_color_deployments(api_client, namespace, name) == [revision], timeout=10)
    assert world.deployment(name)["status"]["observedGeneration"] == 1


def test_an_edit_is_reconciled_with_one_status_write(runtime, api_client, namespace) -> None:
    """The issuer's status fields (its conditions' generation, after an edit) go out with the serving pass's status:
    one PATCH of the status, not one each."""
    world = Cluster(api_client, namespace)
    name = "edited"
    world.apply_deployment(name)
    status_writes = runtime.kube.request_counts
    # Between passes the cluster moves on its own (the Deployment's status, its pods): reconcile until a pass finds
    # nothing new, which then writes nothing.
    deadline = time.monotonic() + 60
    while True:
        settled = status_writes["PATCH deepseekdeployments/status"]
        runtime.deployments.reconcile(namespace, name)
        if status_writes["PATCH deepseekdeployments/status"] == settled:
            break
        assert time.monotonic() < deadline, "every pass wrote status, with or without anything new"
        time.sleep(0.5)

    world.custom.patch_namespaced_custom_object("deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", name,
                                                {"spec": {"rateLimit": {"requestsPerSecond": 7}}})
    runtime.deployments.reconcile(namespace, name)
    assert status_writes["PATCH deepseekdeployments/status"] == settled + 1
    status = world.deployment(name)["status"]
    assert status["observedGeneration"] == 2
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["IssuerReady"]["status"] == "True" and conditions["IssuerReady"]["observedGeneration"] == 2
    assert status["signingKeyId"] and status["authConfigMap"] == f"{name}-auth"
