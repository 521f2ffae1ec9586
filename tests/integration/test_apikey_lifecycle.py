"""ApiKey lifecycle against a real API server: issue, verify, revoke, delete, limits, drift, missing deployment."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from conftest import GROUP, VERSION

pytestmark = pytest.mark.cluster


def test_issued_token_verifies_against_the_published_jwks_and_status_never_holds_it(world):
    world.apply_deployment(rateLimit={"requestsPerSecond": 10, "burst": 20})
    world.create_apikey("alice", environment="prod", scopes=["model:predict", "history:read"], duration="72h")
    key = world.wait_ready("alice")
    token = world.token("alice")
    claims = world.verify(token)
    assert claims["sub"] == "alice" and claims["env"] == "prod"
    assert sorted(claims["scope"]) == ["history:read", "model:predict"]
    assert claims["aud"] == f"{world.namespace}/chat"
    assert claims["iss"] == f"deepseek-operator/{world.namespace}/chat"
    assert claims["uid"] == key["metadata"]["uid"] and claims["jti"] == key["status"]["tokenId"]
    assert claims["exp"] - claims["iat"] == 72 * 3600 and claims["nbf"] == claims["iat"]
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    status = key["status"]
    assert status["revision"] == 1 and status["secretName"] == "alice-apikey"
    for field in ("tokenId", "tokenSHA256", "issuedAt", "expiresAt", "renewalTime", "observedGeneration"):
        assert field in status, field
    assert token not in json.dumps(key) and token.split(".")[1] not in json.dumps(key)
    secret = world.secret("alice-apikey")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
    assert decoded["OPENAI_API_KEY"] == token
    assert decoded["base-url"] == decoded["OPENAI_BASE_URL"] == f"http://chat.{world.namespace}.svc:8000/v1"
    # A first token is told by status (Ready: TokenIssued), not by an Event: rotations and revocations get those.
    assert [e.reason for e in world.events("alice")] == []
    # Another deployment's servers refuse it: the audience binds the key to one deployment.
    world.apply_deployment("other")
    world.wait_for("other-auth", lambda: world.auth("other").get("jwks"))
    with pytest.raises(jwt.PyJWTError):
        world.verify(token, deployment="other")
    # The issuer's objects carry owner references and the deployment's labels.
    configmap = world.core.read_namespaced_config_map("chat-auth", world.namespace)
    assert configmap.metadata.owner_references[0].kind == "DeepSeekDeployment"
    assert configmap.metadata.labels["deepseek.ai/deployment"] == "chat"
    assert "seed" not in json.dumps(world.auth()), "private key material in the ConfigMap"


def test_key_waits_for_its_deployment_and_is_issued_once_it_exists(world):
    world.create_apikey("early")
    waiting = world.wait_condition("early", "Ready", "False", "DeploymentNotFound")
    assert "chat" in next(c["message"] for c in waiting["status"]["conditions"] if c["type"] == "Ready")
    started = time.monotonic()
    world.apply_deployment()
    world.wait_ready("early", timeout=15)
    assert time.monotonic() - started < 5
    world.verify(world.token("early"))


def test_revoke_by_flag_reaches_the_revoked_list_and_unrevoke_issues_a_fresh_token(world):
    world.apply_deployment()
    world.create_apikey("bob")
    first = world.wait_ready("bob")["status"]["tokenId"]
    world.patch_apikey("bob", {"revoked": True})
    revoked = world.wait_condition("bob", "Revoked", "True")
    world.wait_for("revocation in X-auth", lambda: first in world.auth()["revoked"])
    world.wait_for("Secret deleted", lambda: world.secret("bob-apikey") is None)
    ready = next(c for c in revoked["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Revoked")
    assert "tokenId" not in revoked["status"]
    world.patch_apikey("bob", {"revoked": False})
    world.wait_for("a new token", lambda: (world.apikey("bob")["status"].get("tokenId") or first) != first)
    fresh = world.wait_ready("bob")["status"]
    assert fresh["tokenId"] != first and first in world.auth()["revoked"]
    assert world.verify(world.token("bob"))["jti"] == fresh["tokenId"]
    reasons = world.wait_events("bob", "Issued and Revoked", lambda found: "Issued" in found and "Revoked" in found)
    assert reasons.count("Issued") == 1 and "Revoked" in reasons  # the un-revoke's token; the first has none


def test_deleting_a_key_revokes_its_tokens_through_the_finalizer(world):
    world.apply_deployment()
    world.create_apikey("carol", rateLimit={"requestsPerSecond": 1})
    key = world.wait_ready("carol")
    uid, token_id = key["metadata"]["uid"], key["status"]["tokenId"]
    assert "deepseek.ai/finalizer" in key["metadata"]["finalizers"]
    world.wait_for("limits entry", lambda: uid in world.auth()["limits"])
    world.delete_apikey("carol")
    world.wait_for("ApiKey gone", lambda: world.apikey("carol") is None)
    documents = world.auth()
    assert token_id in documents["revoked"] and uid not in documents["limits"]
    assert world.secret("carol-apikey") is None


def test_deleting_a_key_whose_deployment_is_gone_says_so_instead_of_naming_a_revoked_list(world):
    """With its DeepSeekDeployment gone there is no revoked list to write (the auth ConfigMap goes with it, as do the
    servers and the signing keys that alone verify the token): the key is let go, and its Event says why."""
    world.apply_deployment()
    world.create_apikey("hank")
    token_id = world.wait_ready("hank")["status"]["tokenId"]
    world.custom.delete_namespaced_custom_object(GROUP, VERSION, world.namespace, "deepseekdeployments", "chat")
    world.wait_for("deployment gone", lambda: not world.custom.list_namespaced_custom_object(
        GROUP, VERSION, world.namespace, "deepseekdeployments")["items"])
    world.delete_apikey("hank")
    world.wait_for("ApiKey gone", lambda: world.apikey("hank") is None)
    [message] = [e.message for e in world.events("hank") if e.reason == "Revoked"]
    assert message.startswith(f"Revoked 1 token(s) ({token_id}) with their DeepSeekDeployment chat, which is gone: "
                              "its servers and signing keys"), message


def test_rate_limit_change_updates_the_configmap_and_keeps_the_token(world):
    world.apply_deployment()
    world.create_apikey("dave")
    key = world.wait_ready("dave")
    uid, token = key["metadata"]["uid"], world.token("dave")
    assert uid not in world.auth()["limits"], "a key on the defaults needs no entry"
    world.patch_apikey("dave", {"rateLimit": {"requestsPerSecond": 2.5, "burst": 5, "maxParallelRequests": 2}})
    entry = world.wait_for("limits entry", lambda: world.auth()["limits"].get(uid))
    assert entry == {"rps": 2.5, "burst": 5, "tpm": None, "parallel": 2}
    time.sleep(1.5)
    assert world.token("dave") == token
    assert world.apikey("dave")["status"]["revision"] == 1


@pytest.mark.parametrize("damage", ["delete", "tamper"])
def test_lost_or_tampered_secret_is_restored_with_a_new_token_and_the_old_one_revoked(world, damage):
    world.apply_deployment()
    world.create_apikey("erin")
    old = world.wait_ready("erin")["status"]["tokenId"]
    if damage == "delete":
        world.core.delete_namespaced_secret("erin-apikey", world.namespace)
    else:
        forged = base64.b64encode(b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0.").decode()
        world.core.patch_namespaced_secret("erin-apikey", world.namespace, {"data": {"api-key": forged}})
    world.wait_for("old token revoked", lambda: old in world.auth()["revoked"], timeout=15)
    world.wait_for("new token", lambda: world.apikey("erin")["status"].get("tokenId") not in (None, old))
    fresh = world.wait_ready("erin")["status"]
    assert world.verify(world.token("erin"))["jti"] == fresh["tokenId"]
    assert fresh["revision"] == 2
    # events are posted in the background: wait for it rather than read the list once
    warnings = world.wait_for("a Warning event for the restored key",
                              lambda: [e for e in world.events("erin") if e.type == "Warning"])
    assert warnings[0].reason == "Rotated"


def test_many_keys_revoked_at_once_lose_no_revocation(world):
    world.apply_deployment()
    names = [f"k{i}" for i in range(30)]
    for name in names:
        world.create_apikey(name)
    token_ids = {name: world.wait_ready(name, timeout=60)["status"]["tokenId"] for name in names}
    for name in names:
        world.patch_apikey(name, {"revoked": True})
    world.wait_for("all 30 revocations", lambda: set(token_ids.values()) <= set(world.auth()["revoked"]), timeout=30)


def test_secret_name_taken_by_someone_else_is_reported_not_overwritten(world):
    world.apply_deployment()
    world.core.create_namespaced_secret(world.namespace, {"metadata": {"name": "frank-apikey"},
                                                          "stringData": {"api-key": "mine"}})
    world.create_apikey("frank")
    key = world.wait_condition("frank", "Ready", "False", "SecretNameTaken")
    message = next(c["message"] for c in key["status"]["conditions"] if c["type"] == "Ready")
    assert "frank-apikey" in message and "(its owner: none)" in message
    assert base64.b64decode(world.secret("frank-apikey").data["api-key"]) == b"mine"


def test_revoking_a_key_whose_secret_lost_its_owner_reference_still_revokes_its_token(world):
    world.apply_deployment()
    world.create_apikey("gina")
    first = world.wait_ready("gina")["status"]["tokenId"]
    # Whoever can edit the Secret removes its owner reference: the key hears of it and says so.
    world.core.patch_namespaced_secret("gina-apikey", world.namespace,
                                       [{"op": "remove", "path": "/metadata/ownerReferences"}])
    taken = world.wait_condition("gina", "Ready", "False", "SecretNameTaken", timeout=30)
    assert "(its owner: none)" in next(c["message"] for c in taken["status"]["conditions"] if c["type"] == "Ready")
    # Revoking the key still revokes the token it issued; the Secret, no longer its own, is left alone.
    world.patch_apikey("gina", {"revoked": True})
    revoked = world.wait_condition("gina", "Revoked", "True", timeout=30)
    world.wait_for("revocation in X-auth", lambda: first in world.auth()["revoked"])
    assert "tokenId" not in revoked["status"]
    assert world.secret("gina-apikey") is not None


def test_operator_serves_liveness_and_logs_json(kubeconfig, namespace, crds):
    import json as json_module
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepseek_operator", "--namespace", namespace,
         "--liveness", f"http://127.0.0.1:{port}/healthz"],
        env={**os.environ, "KUBECONFIG": kubeconfig}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    return response.status == 200 and json_module.loads(response.read())
            except OSError:
                return None
        # until it has seen the CRDs served, the operator answers {"waitingFor": "crds"}
        probes = wait_for_value(lambda: (answer := healthy()) and "scheduled" in answer and answer)
        assert "scheduled" in probes
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0].decode()
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all(json_module.loads(line)["message"] is not None for line in lines)


def test_kubeconfig_given_as_an_option_alone_is_what_kopf_watches_through(kubeconfig, namespace, crds, tmp_path,
                                                                          api_client):
    """`--kubeconfig` with no $KUBECONFIG and no ~/.kube/config: the operator's watches (kopf) connect with it too,
    as its own client does, so a new DeepSeekDeployment is reconciled."""
    import os
    import subprocess
    import sys

    from kubernetes import client

    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config to fall back on
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepseek_operator", "--kubeconfig", kubeconfig, "--namespace", namespace,
             "--liveness", "none", "--log-format", "plain"], env=env, stdout=log, stderr=subprocess.STDOUT)
    custom = client.CustomObjectsApi(api_client)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment", "metadata": {"name": "chat"},
            "spec": {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "deepseek-server:test"}})

        def reconciled():
            dsd = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "deepseekdeployments", "chat")
            return (dsd.get("status") or {}).get("desiredRevision")
        try:
            wait_for_value(reconciled, timeout=60)
        except AssertionError:
            raise AssertionError("the deployment was not reconciled; the operator's log ends:\n"
                                 + log_path.read_text(errors="replace")[-3000:]) from None
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_stop_asked_for_as_the_crds_are_found_served_is_kept(kubeconfig, crds, monkeypatch):
    """SIGTERM while the operator asks whether its CRDs are served (a pod deleted as it starts): it stops there, and
    does not go on to run, with the signal gone, until the kubelet kills it at the end of its grace period."""
    import os
    import signal

    from deepseek_operator import __main__ as operator_main
    from deepseek_operator.kube import KubeApi
    from deepseek_operator.settings import OperatorSettings

    unserved = KubeApi.unserved

    def unserved_then_stopped(self, resources):
        missing = unserved(self, resources)  # the real answer from the API server: both CRDs are served
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the operator's own handler while it waits for CRDs
        return missing

    monkeypatch.setattr(KubeApi, "unserved", unserved_then_stopped)
    before = signal.getsignal(signal.SIGTERM)
    settings = OperatorSettings(kubeconfig=kubeconfig, liveness_endpoint=None)
    assert operator_main.wait_for_crds(settings) is False
    assert signal.getsignal(signal.SIGTERM) is before


def wait_for_value(check, timeout: float = 20.0, what: str = "the liveness endpoint did not answer"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(what)


def test_deleted_auth_configmap_comes_back_with_its_revocations(world):
    world.apply_deployment()
    world.create_apikey("gina")
    token_id = world.wait_ready("gina")["status"]["tokenId"]
    world.patch_apikey("gina", {"revoked": True})
    world.wait_for("revoked", lambda: token_id in world.auth()["revoked"])
    world.core.delete_namespaced_config_map("chat-auth", world.namespace)
    documents = world.wait_for("X-auth recreated", lambda: world.auth(), timeout=15)
    assert token_id in documents["revoked"] and documents["jwks"]["keys"]


def test_a_key_in_a_namespace_being_deleted_is_finalized_after_its_auth_configmap_is_gone(world, operator):
    # The namespace controller deletes the auth ConfigMap while the key's finalizer holds the key (here: while the
    # operator is down); the revocation cannot be written anywhere then (nothing may be created in the namespace),
    # and the servers that would read it go with the namespace. The key must still be finalized, not retried until
    # its deployment happens to be gone.
    world.apply_deployment()
    world.create_apikey("doomed")
    world.wait_ready("doomed")
    hold = "example.com/hold"  # keeps the deployment while the namespace terminates
    world.custom.patch_namespaced_custom_object(GROUP, VERSION, world.namespace, "deepseekdeployments", "chat",
                                                {"metadata": {"finalizers": [hold]}})
    operator.stop()
    try:
        world.core.delete_namespace(world.namespace)
        world.wait_for("the auth ConfigMap deleted and the ApiKey marked for deletion with the namespace",
                       lambda: not world.core.list_namespaced_config_map(
                           world.namespace, field_selector="metadata.name=chat-auth").items
                       and world.apikey("doomed")["metadata"].get("deletionTimestamp"))
    finally:
        operator.start()
    try:
        world.wait_for("the ApiKey finalized", lambda: world.apikey("doomed") is None, 60)
    finally:
        world.custom.patch_namespaced_custom_object(GROUP, VERSION, world.namespace, "deepseekdeployments", "chat",
                                                    {"metadata": {"finalizers": []}})


def test_a_key_reports_its_deployment_gone_as_soon_as_the_deployment_is_deleted(world):
    # Keys at rest are not looked at on a short timer: the deployment's deletion itself must wake them.
    world.apply_deployment()
    world.create_apikey("orphan")
    world.wait_ready("orphan")
    world.custom.delete_namespaced_custom_object(GROUP, VERSION, world.namespace, "deepseekdeployments", "chat")
    world.wait_condition("orphan", "Ready", "False", "DeploymentNotFound", timeout=30)


def test_kubectl_get_shows_why_a_key_is_not_ready(world, kubeconfig):
    import subprocess
    import sys
    from pathlib import Path

    world.create_apikey("orphan", deployment="nowhere")
    world.wait_condition("orphan", "Ready", "False", "DeploymentNotFound", timeout=60)
    table = subprocess.run([str(Path(sys.executable).with_name("kubectl")), "--kubeconfig", kubeconfig, "get",
                            "apikeys", "orphan", "-n", world.namespace], capture_output=True, text=True, check=True,
                           timeout=60).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:7] == ["NAME", "DEPLOYMENT", "SUBJECT", "ENV", "READY", "REASON", "EXPIRES"], header
    assert row[4:6] == ["False", "DeploymentNotFound"], row
