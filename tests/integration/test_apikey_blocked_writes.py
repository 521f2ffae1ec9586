"""ApiKeys when the API server refuses a write or the auth ConfigMap cannot be read: back off, change nothing
that depends on what is unknown, say why in status, and recover once the obstacle is gone."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import GROUP, VERSION
from deepseek_operator.apikey_plan import ROTATE_ANNOTATION
from kubernetes import client

from devcluster.testing.polling import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def ready_condition(world, name: str) -> dict[str, Any]:
    return next(c for c in world.apikey(name)["status"]["conditions"] if c["type"] == "Ready")


def make_secret_immutable_and_altered(world, name: str) -> None:
    # One write: alter the token and make the Secret immutable, so the operator can neither replace it nor fix it.
    forged = base64.b64encode(b"not-a-token").decode()
    world.core.patch_namespaced_secret(name, world.namespace, {"immutable": True, "data": {"api-key": forged}})


def quota_blocks_new_secrets(world, name: str) -> None:
    # A quota that allows the Secrets there are now but the key's own: once it is deleted it cannot come back.
    secrets = len(world.core.list_namespaced_secret(world.namespace).items)
    world.core.create_namespaced_resource_quota(world.namespace, {
        "metadata": {"name": "no-more-secrets"}, "spec": {"hard": {"count/secrets": str(secrets - 1)}}})
    world.wait_for("the quota in force", lambda: (world.core.read_namespaced_resource_quota(
        "no-more-secrets", world.namespace).status.hard or {}).get("count/secrets"), timeout=30)
    world.core.delete_namespaced_secret(name, world.namespace)


def remove_quota(world, name: str) -> None:
    world.core.delete_namespaced_resource_quota("no-more-secrets", world.namespace)


def delete_blocking_secret(world, name: str) -> None:
    world.core.delete_namespaced_secret(name, world.namespace)


BLOCKERS = {
    "immutable-secret": (make_secret_immutable_and_altered, delete_blocking_secret, "immutable"),
    "secret-quota": (quota_blocks_new_secrets, remove_quota, "quota"),
}


@pytest.mark.parametrize("blocker", sorted(BLOCKERS))
def test_a_secret_that_cannot_be_written_backs_off_instead_of_minting_and_revoking_in_a_loop(world, blocker):
    block, unblock, words = BLOCKERS[blocker]
    world.apply_deployment()
    world.create_apikey("ivan")
    old = world.wait_ready("ivan")["status"]["tokenId"]
    block(world, "ivan-apikey")

    world.wait_for("the replaced token revoked", lambda: old in world.auth()["revoked"], timeout=20)
    time.sleep(8)
    revoked = world.auth()["revoked"]
    # Needed: the replaced token. Nothing else was handed out, so nothing else needs revoking.
    assert len(revoked) <= 2, f"{len(revoked)} token ids revoked in 8 s while the Secret could not be written"
    world.wait_condition("ivan", "Ready", "False", "SecretWriteFailed", timeout=20)
    status = world.apikey("ivan")["status"]
    assert status.get("tokenId") is None, "status must not call the revoked token current"
    message = ready_condition(world, "ivan")["message"]
    assert words in message and "ivan-apikey" in message, message
    assert "eyJ" not in message
    warnings = [e for e in world.events("ivan") if e.reason == "SecretWriteFailed"]
    assert warnings and len(warnings) <= 8, f"{len(warnings)} SecretWriteFailed events"

    unblock(world, "ivan-apikey")
    fresh = world.wait_ready("ivan", timeout=90)["status"]
    assert fresh["tokenId"] != old
    assert world.verify(world.token("ivan"))["jti"] == fresh["tokenId"]
    assert len(world.auth()["revoked"]) <= 2


def test_a_scope_removed_while_the_secret_cannot_be_written_revokes_the_token_in_its_grace_period(world):
    world.apply_deployment()
    world.create_apikey("judy", scopes=["model:predict", "history:read"], gracePeriod="1h")
    first = world.wait_ready("judy")["status"]
    world.custom.patch_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", "judy",
                                                {"metadata": {"annotations": {ROTATE_ANNOTATION: "now"}}})
    second = world.wait_for("the rotation", lambda: (s := world.wait_ready("judy")["status"]).get("revision") == 2
                            and s, timeout=60)
    assert [p["tokenId"] for p in second["previousTokens"]] == [first["tokenId"]]  # in its grace period for 1h
    assert second["previousTokens"][0]["tokenScopes"] == ["history:read", "model:predict"]

    # The Secret is deleted and cannot come back: the token it held is revoked, none is current any more.
    quota_blocks_new_secrets(world, "judy-apikey")
    world.wait_condition("judy", "Ready", "False", "SecretWriteFailed", timeout=30)
    blocked = world.apikey("judy")["status"]
    assert blocked.get("tokenId") is None and second["tokenId"] in world.auth()["revoked"]
    assert [p["tokenId"] for p in blocked["previousTokens"]] == [first["tokenId"]]

    # A scope removed now reaches the token in grace, which holds it, though there is no current token to compare.
    world.patch_apikey("judy", {"scopes": ["model:predict"]})
    world.wait_for("the token in its grace period revoked", lambda: first["tokenId"] in world.auth()["revoked"],
                   timeout=30)
    world.wait_for("status without it", lambda: "previousTokens" not in world.apikey("judy")["status"], timeout=30)

    remove_quota(world, "judy-apikey")
    fresh = world.wait_ready("judy", timeout=90)["status"]
    assert world.verify(world.token("judy"))["scope"] == ["model:predict"]
    assert fresh["tokenId"] not in (first["tokenId"], second["tokenId"])


# ------------------------------------------------------------------------------------------ auth ConfigMap unknown
@contextlib.contextmanager
def auth_writes_refused(api_client, namespace: str) -> Iterator[None]:
    """The API server refuses any write that publishes a key in this namespace's `chat-auth` ConfigMap, so the
    operator cannot recreate or repair it (a ValidatingAdmissionPolicy, evaluated by the API server itself); a
    write that publishes no key at all still goes through."""
    admission = client.AdmissionregistrationV1Api(api_client)
    policy_name = f"block-chat-auth-{namespace}"
    admission.create_validating_admission_policy({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy_name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                    "operations": ["CREATE", "UPDATE"],
                                                    "resources": ["configmaps"]}]},
            "validations": [{"expression": "object.metadata.name != 'chat-auth' || !has(object.data) || "
                                           "!('jwks.json' in object.data) || "
                                           "!object.data['jwks.json'].contains('kid')",
                             "message": "chat-auth is held back by the test"}],
        },
    })
    admission.create_validating_admission_policy_binding({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy_name},
        "spec": {"policyName": policy_name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {
                     "kubernetes.io/metadata.name": namespace}}}},
    })
    core = client.CoreV1Api(api_client)
    probe = {"metadata": {"name": "chat-auth"}, "data": {"jwks.json": '{"keys":[{"kid":"k"}]}'}}

    def refused() -> bool:
        # Policies take effect within a second or two; a refused dry run shows this one does.
        try:
            core.create_namespaced_config_map(namespace, probe, dry_run="All")
        except client.ApiException as exc:
            return exc.status in (403, 409, 422) and "held back" in str(exc.body)
        return False

    try:
        wait_for("the admission policy in force", refused, timeout=30)
        yield
    finally:
        admission.delete_validating_admission_policy_binding(policy_name)
        admission.delete_validating_admission_policy(policy_name)


def _hide_configmap(world) -> None:
    world.core.delete_namespaced_config_map("chat-auth", world.namespace)


def _break_configmap(world) -> None:
    world.core.patch_namespaced_config_map("chat-auth", world.namespace, {"data": {"jwks.json": None}})


@pytest.mark.parametrize("damage", ["deleted", "unreadable"])
def test_an_unknown_auth_configmap_neither_rotates_nor_revokes_and_says_so(world, api_client, damage):
    world.apply_deployment()
    world.create_apikey("judy")
    before = world.wait_ready("judy")["status"]
    token = world.token("judy")
    with auth_writes_refused(api_client, world.namespace):
        (_hide_configmap if damage == "deleted" else _break_configmap)(world)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and ready_condition(world, "judy")["reason"] != "AuthConfigUnknown":
            time.sleep(0.2)
        time.sleep(4)  # several issuer checks and key reconciles later
        during = world.apikey("judy")["status"]
        said = next(c for c in during["conditions"] if c["type"] == "Ready")

    after = world.wait_ready("judy", timeout=30)["status"]
    documents = world.wait_for("chat-auth readable again", lambda: (d := world.auth()) and "jwks" in d and d)
    assert before["tokenId"] not in documents["revoked"], "a valid token was revoked while chat-auth was unknown"
    assert after["tokenId"] == before["tokenId"] and after["revision"] == before["revision"], (
        f"the key was re-issued: {before['tokenId']} -> {after['tokenId']}")
    assert world.token("judy") == token
    assert world.verify(token)["jti"] == before["tokenId"]
    assert during["tokenId"] == before["tokenId"] and "pendingToken" not in during
    assert (said["status"], said["reason"]) == ("Unknown", "AuthConfigUnknown"), said
    assert "chat-auth" in said["message"], said["message"]
