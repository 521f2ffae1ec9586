"""Objects the operator did not create are never taken over: a DeepSeekDeployment whose fixed child names are
already taken reports a Conflict naming each one (condition and Event), leaves it as it is, and proceeds once the
squatter is gone. A `<name>-signing-key` Secret someone else made in the tenant's namespace (where earlier releases
kept private keys) is no child at all any more: never read, adopted or deleted."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from kubernetes import client

pytestmark = pytest.mark.cluster

SQUAT_LABELS = {"team": "someone-else"}


def conflict(world, name: str) -> dict[str, Any] | None:
    conditions = ((world.deployment(name).get("status") or {}).get("conditions")) or []
    return next((c for c in conditions if c["type"] == "Conflict"), None)


def wait_conflict_naming(world, name: str, kind: str, child: str) -> dict[str, Any]:
    def named() -> dict[str, Any] | None:
        found = conflict(world, name)
        if found and found["status"] == "True" and f"{kind} {world.namespace}/{child}" in found["message"]:
            return found
        return None
    return world.wait_for(f"Conflict naming {kind} {child}", named, timeout=30)


def squat(world, name: str) -> dict[str, Any]:
    """Objects with the deployment's child names, created by someone else (no owner): what each holds now."""
    ns = world.namespace
    apps = client.AppsV1Api(world.core.api_client)
    world.core.create_namespaced_secret(ns, {"metadata": {"name": f"{name}-signing-key", "labels": SQUAT_LABELS},
                                             "data": {"k": base64.b64encode(b"theirs").decode()}})
    world.core.create_namespaced_config_map(ns, {"metadata": {"name": f"{name}-auth", "labels": SQUAT_LABELS},
                                                 "data": {"jwks.json": '{"keys": []}', "owner": "someone else"}})
    world.core.create_namespaced_service(ns, {"metadata": {"name": name, "labels": SQUAT_LABELS},
                                              "spec": {"selector": {"app": "theirs"},
                                                       "ports": [{"name": "web", "port": 80}]}})
    labels = {"app": "theirs"}
    apps.create_namespaced_deployment(ns, {
        "metadata": {"name": f"{name}-blue", "labels": SQUAT_LABELS},
        "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "web", "image": "theirs:1"}]}}}})
    return snapshot(world, name)


def snapshot(world, name: str) -> dict[str, Any]:
    """What a squatter would notice changing: labels, owners, content."""
    ns = world.namespace
    apps = client.AppsV1Api(world.core.api_client)
    found: dict[str, Any] = {}
    readers = {
        "Secret": (f"{name}-signing-key", world.core.read_namespaced_secret, lambda o: o.data),
        "ConfigMap": (f"{name}-auth", world.core.read_namespaced_config_map, lambda o: o.data),
        "Service": (name, world.core.read_namespaced_service, lambda o: (o.spec.selector, len(o.spec.ports))),
        "Deployment": (f"{name}-blue", apps.read_namespaced_deployment,
                       lambda o: (o.spec.replicas, o.spec.template.spec.containers[0].image)),
    }
    for kind, (child, read, content) in readers.items():
        try:
            obj = read(child, ns)
        except client.ApiException as exc:
            if exc.status == 404:
                continue
            raise
        found[kind] = (obj.metadata.labels, obj.metadata.owner_references, content(obj))
    return found


def test_squatted_child_names_are_left_untouched_and_reported_until_removed(world):
    name = "squat"
    before = squat(world, name)
    world.apply_deployment(name)
    ns = world.namespace
    apps = client.AppsV1Api(world.core.api_client)

    # One squatter after another: each is reported by kind and name, with what to do, and left as it was.
    order = [("ConfigMap", f"{name}-auth", world.core.delete_namespaced_config_map),
             ("Service", name, world.core.delete_namespaced_service),
             ("Deployment", f"{name}-blue", apps.delete_namespaced_deployment)]
    for kind, child, delete in order:
        found = wait_conflict_naming(world, name, kind, child)
        assert found["reason"] == "NotOwned"
        assert "delete" in found["message"].lower() or "rename" in found["message"].lower(), found["message"]
        # Only the squatters still there (a freed name holds the deployment's own object by now).
        now = {k: v for k, v in snapshot(world, name).items() if k in before}
        assert now == before, f"a squatter changed while {kind} {child} was reported:\n{before}\n{now}"
        # The Event is posted after the condition is written: it may come a moment later.
        events = world.wait_for(f"Conflict Event naming {child}", lambda child=child: [
            e for e in world.events(name) if e.reason == "Conflict" and child in (e.message or "")], timeout=15)
        assert events[0].type == "Warning", [(e.reason, e.type, e.message) for e in events]
        delete(child, ns)
        before.pop(kind)

    # With every name free, the deployment proceeds: its own children exist, owned by it, and Conflict clears.
    def cleared() -> dict[str, Any] | None:
        found = conflict(world, name)
        return found if found and found["status"] == "False" else None
    world.wait_for("Conflict=False", cleared, timeout=30)
    uid = world.deployment(name)["metadata"]["uid"]
    blue = world.wait_for("squat-blue created", lambda: _read_or_none(apps.read_namespaced_deployment,
                                                                      f"{name}-blue", ns), timeout=30)
    for obj in (blue, world.core.read_namespaced_config_map(f"{name}-auth", ns)):
        owners = [(o.uid, o.controller) for o in obj.metadata.owner_references or []]
        assert owners == [(uid, True)], (obj.metadata.name, owners)
    assert world.auth(name).get("jwks", {}).get("keys")
    # The keys are in the operator's namespace; the squatted old-layout Secret is still exactly as it was.
    assert world.signing_key_secret(name) is not None
    assert {k: v for k, v in snapshot(world, name).items() if k == "Secret"} == before == {"Secret": before["Secret"]}


def _read_or_none(read, name: str, namespace: str) -> Any:
    try:
        return read(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_no_server_is_created_while_someone_else_holds_the_auth_configmap(world):
    """Only `X-auth` is taken: servers would read someone else's keys and revocations from it, so no Deployment of
    either color (and no pod) is made while the Conflict names it; once it is deleted the deployment proceeds."""
    name = "authsquat"
    ns = world.namespace
    apps = client.AppsV1Api(world.core.api_client)
    world.core.create_namespaced_config_map(ns, {"metadata": {"name": f"{name}-auth", "labels": SQUAT_LABELS},
                                                 "data": {"jwks.json": '{"keys": []}', "owner": "someone else"}})
    world.apply_deployment(name)
    wait_conflict_naming(world, name, "ConfigMap", f"{name}-auth")

    def servers() -> list[str]:
        made = [d.metadata.name for d in apps.list_namespaced_deployment(ns).items
                if d.metadata.name in (f"{name}-blue", f"{name}-green")]
        pods = [p.metadata.name for p in world.core.list_namespaced_pod(ns).items
                if p.metadata.name.startswith(f"{name}-")]
        return made + pods

    # several reconciles later (the Conflict is re-checked on the operator's retry interval), still nothing
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert servers() == [], servers()
        time.sleep(0.5)
    assert world.core.read_namespaced_config_map(f"{name}-auth", ns).data["owner"] == "someone else"
    world.core.delete_namespaced_config_map(f"{name}-auth", ns)
    world.wait_for(f"{name}-blue created once {name}-auth is free",
                   lambda: _read_or_none(apps.read_namespaced_deployment, f"{name}-blue", ns), timeout=30)
