"""`spec.autoscaling` is validated by the API server itself: `kubectl apply` of a bad spec is refused with a message
that says what to fix, and a good one is stored with the schema's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

KUBECTL = str(Path(sys.executable).with_name("kubectl"))


def dsd(name: str = "chat", **autoscaling: Any) -> dict[str, Any]:
    return {"apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:1",
                     "autoscaling": {"enabled": True, **autoscaling}}}


def apply(kubeconfig: str, namespace: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "apply", "-n", namespace, "-f", "-"], input=json.dumps(obj), text=True,
                          capture_output=True, env={**os.environ, "KUBECONFIG": kubeconfig}, timeout=30)


INVALID = [
    ("min above max", dsd(minReplicas=3, maxReplicas=2),
     "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
    ("min zero", dsd(minReplicas=0, maxReplicas=2), "autoscaling.minReplicas must be at least 1"),
    ("max zero", dsd(minReplicas=1, maxReplicas=0), "autoscaling.maxReplicas must be between 1 and 1000"),
    ("target zero", dsd(maxReplicas=2, targetPerReplica=0), "autoscaling.targetPerReplica must be greater than 0"),
    ("target negative", dsd(maxReplicas=2, targetPerReplica=-4),
     "autoscaling.targetPerReplica must be greater than 0"),
    ("up window too long", dsd(maxReplicas=2, scaleUp={"stabilizationWindowSeconds": 7200}),
     "autoscaling.scaleUp.stabilizationWindowSeconds must be between 0 and 3600"),
    ("down window negative", dsd(maxReplicas=2, scaleDown={"stabilizationWindowSeconds": -1}),
     "autoscaling.scaleDown.stabilizationWindowSeconds must be between 0 and 3600"),
    ("unknown metric", dsd(maxReplicas=2, metric="GPUUtilization"), 'Unsupported value: "GPUUtilization"'),
]


@pytest.mark.parametrize(("case", "obj", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_bad_autoscaling_is_refused_by_the_api_server(crds, kubeconfig, namespace, case, obj, message):
    result = apply(kubeconfig, namespace, obj)
    assert result.returncode != 0, f"{case}: accepted"
    assert message in result.stderr, result.stderr


def test_autoscaling_is_stored_with_defaults(crds, kubeconfig, namespace, api_client):
    from kubernetes import client

    result = apply(kubeconfig, namespace, dsd(maxReplicas=4))
    assert result.returncode == 0, result.stderr
    stored = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", "chat")
    assert stored["spec"]["autoscaling"] == {
        "enabled": True, "minReplicas": 1, "maxReplicas": 4, "metric": "InFlightRequests", "targetPerReplica": 4,
        "scaleUp": {"stabilizationWindowSeconds": 30}, "scaleDown": {"stabilizationWindowSeconds": 300}}
    # min == max is a fixed count, and a deployment without autoscaling gets no block at all
    assert apply(kubeconfig, namespace, dsd("fixed", minReplicas=2, maxReplicas=2)).returncode == 0
    plain = dsd("plain")
    del plain["spec"]["autoscaling"]
    assert apply(kubeconfig, namespace, plain).returncode == 0
    stored = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        "deepseek.ai", "v1alpha1", namespace, "deepseekdeployments", "plain")
    assert "autoscaling" not in stored["spec"]
