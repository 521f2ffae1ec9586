"""A color Deployment the API server refuses (422 Invalid) rolls the revision back at once, saying why (pure: a
stand-in for the API, no cluster).

Without this, every pass failed on the same write before it wrote status: the rollout stayed in Provisioning past
its deadline, and the reason was only in the operator's log."""

from __future__ import annotations

from typing import Any

from deepseek_operator.kube import KubeError, Resource
from deepseek_operator.serving import ServingReconciler
from deepseek_operator.workloads import DEPLOYMENTS

REFUSAL = ('Deployment.apps "chat-blue" is invalid: spec.template.spec.affinity.nodeAffinity.'
           "requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values: "
           "Required value: must be specified when `operator` is 'In' or 'NotIn'")


def merged(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch applied to `target`."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


class RefusingApi:
    """Nothing exists yet; every write of a color Deployment is refused as the API server refuses an invalid pod
    template; the DeepSeekDeployment's status is kept."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str, str]] = []
        self.deployment_writes = 0

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def list(self, resource: Resource, namespace: str, **_: Any) -> list[dict[str, Any]]:
        return []

    def create_or_apply(self, *_: Any, **__: Any) -> None:
        return None

    def create_or_replace(self, resource: Resource, namespace: str, desired: dict[str, Any], **_: Any) -> None:
        assert resource == DEPLOYMENTS
        self.deployment_writes += 1
        raise KubeError(422, "Invalid", REFUSAL, "POST", f"/apis/apps/v1/namespaces/{namespace}/deployments")

    def replace(self, *_: Any, **__: Any) -> None:
        return None

    def merge_status(self, resource: Resource, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.status = merged(self.status, status)
        return {"status": self.status}

    def post_event(self, involved: Any, *, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def test_a_refused_pod_template_rolls_the_revision_back_with_the_api_servers_reason():
    api = RefusingApi()
    serving = ServingReconciler(api, issuers=None, clock=lambda: 1_000_000.0)  # type: ignore[arg-type]
    dsd = {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment",
           "metadata": {"name": "chat", "namespace": "ns", "uid": "u-1", "generation": 1},
           "spec": {"model": {"name": "m", "source": {"pvc": {"claimName": "weights"}}}, "image": "server:1",
                    "replicas": 1,
                    "scheduling": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In"}]}]}}}}},
           "status": {}}
    for _ in range(3):  # each pass goes as far as it can; the refusal must not keep it from writing status
        serving.reconcile({**dsd, "status": api.status})
    rollout = api.status["rollout"]
    assert rollout["phase"] == "Degraded", rollout
    assert rollout["reason"] == "InvalidPodTemplate"
    assert REFUSAL in rollout["message"]
    assert api.status["failedRevision"] == rollout["revision"]
    degraded = next(c for c in api.status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidPodTemplate"
    assert any(reason == "RolledBack" and "InvalidPodTemplate" in message for _, reason, message in api.events)
    # Degraded: the failed revision is not written again until the spec changes or a retry asks for it.
    writes = api.deployment_writes
    serving.reconcile({**dsd, "status": api.status})
    assert api.deployment_writes == writes
