"""What the README-claim e2e tests share: ApiKeys with chosen lifetimes, the token in a key's Secret, calls straight to
each server pod, the server pods' logs on devcluster, and the managedFields check that the operator never writes
spec."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from devcluster.testing.bluegreen import GROUP, VERSION, World

SERVER_PORT = 8000


def create_apikey(world: World, name: str, deployment: str = "chat", **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": name},
            "spec": {"deploymentRef": {"name": deployment}, "subject": name, "environment": "dev",
                     "scopes": ["model:predict"], **spec}}
    return world.custom.create_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", body)


def get_apikey(world: World, name: str) -> dict[str, Any]:
    return world.custom.get_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", name)


def secret_token(world: World, name: str) -> str | None:
    """The token in ApiKey `name`'s Secret, read from the API as a mounted Secret volume would show it."""
    try:
        secret = world.core.read_namespaced_secret(f"{name}-apikey", world.namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    data = secret.data or {}
    return base64.b64decode(data["api-key"]).decode() if "api-key" in data else None


def token_id(token: str) -> str:
    """The `jti` of a token (its payload read without verifying; only the test holds the token)."""
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def server_pod_ips(world: World, name: str = "chat", color: str | None = None) -> dict[str, str]:
    """pod name -> IP of the deployment's running server pods (of one color when given)."""
    selector = f"deepseek.ai/deployment={name}" + (f",deepseek.ai/color={color}" if color else "")
    pods = world.core.list_namespaced_pod(world.namespace, label_selector=selector).items
    return {p.metadata.name: p.status.pod_ip for p in pods
            if p.status.phase == "Running" and p.status.pod_ip and p.metadata.deletion_timestamp is None}


def call_models(ip: str, token: str) -> httpx.Response:
    """`GET /v1/models` on one pod with `token`: authenticated, and cheap enough to poll."""
    return httpx.get(f"http://{ip}:{SERVER_PORT}/v1/models", headers={"Authorization": f"Bearer {token}"},
                     timeout=10, trust_env=False)


def refused(response: httpx.Response, *reasons: str) -> bool:
    """A 401 whose message names one of `reasons` (e.g. 'revoked', 'expired')."""
    if response.status_code != 401:
        return False
    message = response.json()["error"]["message"]
    return any(reason in message for reason in reasons)


def server_logs(cluster: Any, namespace: str) -> dict[str, str]:
    """Every container log of every pod that ran in `namespace` (devcluster keeps them under its state dir)."""
    root = Path(cluster.state_dir) / "pods"
    return {str(path.relative_to(root)): path.read_text(errors="replace")
            for path in sorted(root.glob(f"{namespace}_*/logs/*/*.log"))}


def assert_no_token_in(texts: dict[str, str], tokens: list[str]) -> None:
    """No token, no token's signature and no JWT at all ('eyJ' opens every JWT header) in any of `texts`."""
    assert tokens, "no token to look for"
    for where, text in texts.items():
        assert "eyJ" not in text, f"a JWT appears in {where}"
        for token in tokens:
            assert token.split(".")[2] not in text, f"a token's signature appears in {where}"


def event_messages(world: World, reasons: tuple[str, ...]) -> dict[str, str]:
    return {f"{e.reason} {e.involved_object.kind}/{e.involved_object.name} {e.metadata.name}": e.message or ""
            for e in world.core.list_namespaced_event(world.namespace).items if e.reason in reasons}


def spec_owners(obj: dict[str, Any]) -> set[str]:
    """Field managers that own any field under `spec` of `obj`."""
    return {entry["manager"] for entry in obj["metadata"].get("managedFields") or []
            if "f:spec" in (entry.get("fieldsV1") or {})}


def assert_spec_untouched(obj: dict[str, Any], test_manager: str, generation: int) -> None:
    """Only the test's own field manager owns spec fields, and `metadata.generation` moved only with its edits."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    owners = spec_owners(obj)
    assert owners == {test_manager}, f"{kind}/{name}: spec fields owned by {sorted(owners)}, not only by the test"
    assert obj["metadata"]["generation"] == generation, (
        f"{kind}/{name}: generation {obj['metadata']['generation']}, the test's own edits make it {generation}")


def manager_of(created: dict[str, Any]) -> str:
    """The field manager the test's own client writes with (the only one on an object it just created)."""
    managers = {entry["manager"] for entry in created["metadata"].get("managedFields") or []}
    assert len(managers) == 1, managers
    return managers.pop()

