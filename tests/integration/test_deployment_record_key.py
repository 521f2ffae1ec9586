"""The servers' record key (the HMAC key of audit fingerprints and response-cache keys): the operator makes the
`<deployment>-record-key` Secret once, owned by the DeepSeekDeployment, never rewrites it, and feeds it to the server
containers from the environment, with the deployment and the rollout revision on their command line."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kubernetes import client

pytestmark = pytest.mark.cluster


def server_container(deployment: client.V1Deployment) -> client.V1Container:
    return next(c for c in deployment.spec.template.spec.containers if c.name == "server")


def color_deployment_with_revision(world, name: str, revision: str) -> client.V1Deployment | None:
    apps = client.AppsV1Api(world.core.api_client)
    for color in ("blue", "green"):
        try:
            found = apps.read_namespaced_deployment(f"{name}-{color}", world.namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                continue
            raise
        if (found.spec.template.metadata.labels or {}).get("deepseek.ai/revision") == revision:
            return found
    return None


def test_the_record_key_is_made_once_owned_and_given_to_every_revision(world) -> None:
    name = "records"
    world.apply_deployment(name)
    secret = world.wait_for("the record-key Secret", lambda: world.secret(f"{name}-record-key"), timeout=60)
    uid = world.deployment(name)["metadata"]["uid"]
    assert [(o.uid, o.controller) for o in secret.metadata.owner_references or []] == [(uid, True)]
    key = base64.b64decode(secret.data["record-key"]).decode()
    assert len(key) >= 32

    def revision() -> str | None:
        status: dict[str, Any] = world.deployment(name).get("status") or {}
        return (status.get("rollout") or {}).get("revision") or status.get("activeRevision")

    first = world.wait_for("a revision in status", revision, timeout=60)
    deployment = world.wait_for(f"the Deployment of revision {first}",
                                lambda: color_deployment_with_revision(world, name, first), timeout=60)
    container = server_container(deployment)
    args = " ".join(container.args)
    assert f"--deployment {world.namespace}/{name}" in args and f"--model-revision {first}" in args
    assert key not in args
    [env] = [e for e in container.env if e.name == "DEEPSEEK_RECORD_KEY"]
    assert (env.value_from.secret_key_ref.name, env.value_from.secret_key_ref.key) == (f"{name}-record-key",
                                                                                       "record-key")

    # A new revision gets its own --model-revision (so it never serves the old answers), and the same key.
    world.custom.patch_namespaced_custom_object("deepseek.ai", "v1alpha1", world.namespace, "deepseekdeployments",
                                                name, {"spec": {"server": {"maxNewTokens": 77}}})
    second = world.wait_for("a new revision", lambda: (r := revision()) != first and r, timeout=60)
    newer = world.wait_for(f"the Deployment of revision {second}",
                           lambda: color_deployment_with_revision(world, name, second), timeout=60)
    assert f"--model-revision {second}" in " ".join(server_container(newer).args)
    again = world.secret(f"{name}-record-key")
    assert again is not None and again.data == secret.data
    assert again.metadata.resource_version == secret.metadata.resource_version  # never rewritten
