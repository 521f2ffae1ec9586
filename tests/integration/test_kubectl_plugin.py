"""`kubectl deepseek` (the kubectl-deepseek entry point) run as a subprocess against devcluster and the operator."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GROUP, VERSION, Cluster, wait_for

BIN = Path(sys.executable).parent
PLUGIN = BIN / "kubectl-deepseek"
# An image devcluster maps to no process (its pods would be simulated); with more GPUs than a node has, the pods
# stay Pending, so a rollout waits in Starting for as long as the test needs.
UNSCHEDULABLE = {"image": "registry.example/unmapped-server:1", "resources": {"gpus": 9},
                 "rollout": {"progressDeadlineSeconds": 900}}


def plugin(kubeconfig: str, *args: str, via_kubectl: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(BIN / "kubectl"), "deepseek", *args] if via_kubectl else [str(PLUGIN), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("command", ["status", "promote", "abort", "retry", "keys", "rotate", "env"])
def test_every_command_has_help(command: str) -> None:
    result = subprocess.run([str(PLUGIN), command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and f"kubectl deepseek {command}" in result.stdout
    assert "--namespace" in result.stdout


def annotations(world: Cluster, name: str = "chat") -> dict[str, str]:
    return world.deployment(name)["metadata"].get("annotations") or {}


def rollout_of(world: Cluster, name: str = "chat") -> dict:
    return (world.deployment(name).get("status") or {}).get("rollout") or {}


def wait_rollout(world: Cluster, phase: str, what: str, timeout: float = 90) -> dict:
    return wait_for(what, lambda: (r := rollout_of(world)).get("phase") == phase and r, timeout)


def test_promote_abort_retry_pick_the_revision_and_the_operator_acts_on_them(world: Cluster, kubeconfig: str) -> None:
    ns = world.namespace
    missing = failed(plugin(kubeconfig, "status", "nope", "-n", ns))
    assert f"DeepSeekDeployment 'nope' not found in namespace '{ns}'" in missing

    world.apply_deployment(**UNSCHEDULABLE)
    starting = wait_rollout(world, "Starting", "the first rollout waiting for GPUs")
    revision = starting["revision"]
    # The shortage is reported once the scheduler has left the new pods pending, after the rollout started.
    wait_for("CapacityAvailable=False", lambda: any(
        c["type"] == "CapacityAvailable" and c["status"] == "False"
        for c in (world.deployment().get("status") or {}).get("conditions") or []), 90)
    status_text = ok(plugin(kubeconfig, "status", "chat", "-n", ns))
    assert f"revision {revision} on blue is Starting" in status_text
    assert "Traffic: no revision has been promoted yet" in status_text
    assert "CapacityAvailable=False" in status_text
    assert "kubectl deepseek abort chat" in status_text

    assert "is Starting; wait for it to finish or abort it first" in failed(plugin(kubeconfig, "retry", "chat",
                                                                                   "-n", ns))
    out = ok(plugin(kubeconfig, "promote", "chat", "-n", ns))
    assert f"deepseek.ai/promote={revision}" in out
    assert annotations(world)["deepseek.ai/promote"] == revision
    assert "already set" in ok(plugin(kubeconfig, "promote", "chat", "-n", ns))

    # abort: the operator rolls the revision back; it becomes the failed revision.
    assert f"deepseek.ai/abort={revision}" in ok(plugin(kubeconfig, "abort", "chat", "-n", ns))
    degraded = wait_rollout(world, "Degraded", "the aborted rollout")
    assert degraded["reason"] == "Aborted"
    status_text = ok(plugin(kubeconfig, "status", "chat", "-n", ns))
    assert f"Failed revision: {revision}" in status_text
    assert f"revision {revision}  Aborted" in status_text
    assert "`kubectl deepseek retry chat`" in status_text
    assert "no rollout is in progress" in failed(plugin(kubeconfig, "promote", "chat", "-n", ns))
    assert "nothing to abort" in failed(plugin(kubeconfig, "abort", "chat", "-n", ns))

    # retry: the same revision rolls out again.
    assert f"deepseek.ai/retry={revision}" in ok(plugin(kubeconfig, "retry", "chat", "-n", ns))
    wait_for("the retried rollout", lambda: (world.deployment().get("status") or {}).get("retriedRevision")
             == revision and rollout_of(world).get("phase") == "Starting", 90)
    ok(plugin(kubeconfig, "abort", "chat", "-n", ns))
    wait_rollout(world, "Degraded", "the second abort")
    # A second retry of the same revision: the plugin clears the used annotation first, then sets it again.
    ok(plugin(kubeconfig, "retry", "chat", "-n", ns))
    wait_rollout(world, "Starting", "the second retry")
    assert annotations(world)["deepseek.ai/retry"] == revision
    history = world.deployment()["status"]["history"]
    assert [entry["result"] for entry in history][:2] == ["Aborted", "Aborted"]

    # A spec change is a new revision: retry refuses and says why.
    ok(plugin(kubeconfig, "abort", "chat", "-n", ns))
    wait_rollout(world, "Degraded", "the third abort")
    world.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "deepseekdeployments", "chat",
                                                {"spec": {"server": {"maxNewTokens": 64}}})
    wait_for("the new revision's rollout", lambda: rollout_of(world).get("revision") not in (None, revision), 90)
    abort_text = ok(plugin(kubeconfig, "abort", "chat", "-n", ns))
    newer = rollout_of(world)["revision"]
    assert f"deepseek.ai/abort={newer}" in abort_text
    wait_rollout(world, "Degraded", "the abort of the new revision")
    assert world.deployment()["status"]["desiredRevision"] == newer  # what `retry` and `status` go by

    # Retried with kubectl annotate alone, the abort left on the failed attempt does not abort the new one: the
    # operator removes it (guarded by its value) as it starts the revision again.
    world.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "deepseekdeployments", "chat",
                                                {"metadata": {"annotations": {"deepseek.ai/retry": newer}}})
    wait_for("the retry by annotation", lambda: rollout_of(world).get("phase") == "Starting"
             and (world.deployment().get("status") or {}).get("retriedRevision") == newer, 90)
    assert "deepseek.ai/abort" not in annotations(world)
    time.sleep(3)  # a few of the operator's 2 s passes: the attempt is still going
    assert (rollout_of(world)["phase"], rollout_of(world)["revision"]) == ("Starting", newer)
    assert any(e.reason == "AnnotationsCleared" and f"deepseek.ai/abort={newer}" in (e.message or "")
               for e in world.core.list_namespaced_event(ns).items)


def secret_value(world: Cluster, secret: str, key: str) -> str:
    found = world.secret(secret)
    assert found is not None and found.data
    return base64.b64decode(found.data[key]).decode()


def test_keys_env_and_rotate(world: Cluster, kubeconfig: str) -> None:
    ns = world.namespace
    world.apply_deployment()
    world.create_apikey("alice", scopes=["model:predict", "history:read"], environment="prod")
    world.create_apikey("bob")
    first = world.wait_ready("alice")["status"]
    world.wait_ready("bob")

    table = ok(plugin(kubeconfig, "keys", "-n", ns, via_kubectl=True))  # found by kubectl on PATH, krew-style
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["NAME", "DEPLOYMENT", "SUBJECT", "ENV", "SCOPES"]
    alice = next(line for line in lines if line.startswith("alice"))
    assert "chat" in alice and "prod" in alice and "model:predict,history:read" in alice
    assert first["expiresAt"] in alice and first["issuedAt"] in alice
    assert "model:predict(default)" in next(line for line in lines if line.startswith("bob"))  # what its token holds
    assert "eyJ" not in table

    exports = ok(plugin(kubeconfig, "env", "alice", "-n", ns))
    token = secret_value(world, "alice-apikey", "api-key")
    assert exports.splitlines() == [f"export OPENAI_API_KEY={token}",
                                    f"export OPENAI_BASE_URL=http://chat.{ns}.svc:8000/v1"]
    # from outside the cluster (a port-forward, an Ingress): the key with another base URL
    local = ok(plugin(kubeconfig, "env", "alice", "-n", ns, "--base-url", "http://127.0.0.1:8000/v1/"))
    assert local.splitlines() == [f"export OPENAI_API_KEY={token}", "export OPENAI_BASE_URL=http://127.0.0.1:8000/v1"]
    for bad in ("127.0.0.1:8000/v1", "ftp://gateway/v1", "http:///v1", "http://gateway/v1?x=1"):
        refused = plugin(kubeconfig, "env", "alice", "-n", ns, "--base-url", bad)
        assert refused.returncode == 2 and "is not an http(s) URL" in refused.stderr, refused.stderr
        assert token not in refused.stdout + refused.stderr

    # rotate: a new token now, the old one in its grace period; one rotation per request.
    out = ok(plugin(kubeconfig, "rotate", "alice", "-n", ns))
    rotated = world.apikey("alice")["status"]
    assert rotated["tokenId"] != first["tokenId"] and rotated["revision"] == first["revision"] + 1
    assert f"token {rotated['tokenId']}" in out and f"previous token {first['tokenId']} keeps working" in out
    assert [p["tokenId"] for p in rotated["previousTokens"]] == [first["tokenId"]]
    new_token = secret_value(world, "alice-apikey", "api-key")
    assert new_token != token and world.verify(new_token)["jti"] == rotated["tokenId"]
    world.wait_for("the Rotated Event", lambda: any(
        "rotation asked for with the deepseek.ai/rotate annotation" in (e.message or "")
        for e in world.events("alice") if e.reason == "Rotated"), timeout=30)
    assert "eyJ" not in out
    time.sleep(4)  # several drift checks (1 s apart) of the operator: the same request rotates nothing more
    assert world.apikey("alice")["status"]["revision"] == rotated["revision"]
    assert ok(plugin(kubeconfig, "env", "alice", "-n", ns)).startswith(f"export OPENAI_API_KEY={new_token}\n")
    ok(plugin(kubeconfig, "rotate", "alice", "-n", ns))
    assert world.apikey("alice")["status"]["revision"] == rotated["revision"] + 1

    assert "ApiKey 'carol' not found" in failed(plugin(kubeconfig, "rotate", "carol", "-n", ns))
    world.patch_apikey("bob", {"revoked": True})
    world.wait_condition("bob", "Revoked", "True")
    assert "is revoked" in failed(plugin(kubeconfig, "rotate", "bob", "-n", ns))
    assert "is revoked" in failed(plugin(kubeconfig, "env", "bob", "-n", ns))


def test_rotations_past_the_bound_on_tokens_out_wait_and_say_so(world: Cluster, kubeconfig: str) -> None:
    from deepseek_operator.apikey_plan import ROTATE_ANNOTATION, TOKENS_PER_KEY

    ns = world.namespace
    world.apply_deployment()
    world.create_apikey("churn", gracePeriod="0s")  # each rotation revokes the token it replaces at once
    world.wait_ready("churn")

    def rotate(value: str) -> None:
        world.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "apikeys", "churn",
                                                    {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})

    for n in range(1, TOKENS_PER_KEY):  # the first token and 31 rotations: the most one key may have out
        rotate(f"r{n}")
        world.wait_for(f"rotation {n}", lambda n=n: (world.apikey("churn")["status"]).get("rotationRequest")
                       == f"r{n}", timeout=30)
    status = world.apikey("churn")["status"]
    assert len(status["recentTokens"]) == TOKENS_PER_KEY and status["revision"] == TOKENS_PER_KEY
    revoked = set(world.auth()["revoked"])
    assert len(revoked) == TOKENS_PER_KEY - 1

    rotate("one-too-many")
    held = world.wait_condition("churn", "Ready", "True", "RotationHeld", timeout=30)["status"]
    ready = next(c for c in held["conditions"] if c["type"] == "Ready")
    assert f"{TOKENS_PER_KEY} tokens of this key are out" in ready["message"]
    assert held["tokenId"] == status["tokenId"], "the current token stays current"
    world.wait_events("churn", "a RotationHeld warning", lambda reasons: "RotationHeld" in reasons)
    time.sleep(3)  # drift checks of the operator: still nothing issued, nothing more revoked
    assert world.apikey("churn")["status"]["revision"] == TOKENS_PER_KEY
    assert set(world.auth()["revoked"]) == revoked
    assert "cannot have another token yet" in failed(plugin(kubeconfig, "rotate", "churn", "-n", ns))
    assert world.verify(world.token("churn"))["jti"] == status["tokenId"]

    # A new subject revokes the current token at once, and at the bound no new one is issued: the Secret keeps the
    # revoked token, which `env` must not hand out (it printed it, with exit 0)
    kept = world.token("churn")
    world.patch_apikey("churn", {"subject": "churn-renamed"})
    world.wait_condition("churn", "Ready", "False", "TokenLimitReached", timeout=30)
    assert status["tokenId"] in world.auth()["revoked"]
    assert world.token("churn") == kept, "the Secret still holds the revoked token"
    refused = failed(plugin(kubeconfig, "env", "churn", "-n", ns))
    assert "has no token in force now" in refused and "TokenLimitReached" in refused
    assert kept not in refused
    held_rotation = failed(plugin(kubeconfig, "rotate", "churn", "-n", ns))  # not "it gets its first token"
    assert "cannot have another token yet" in held_rotation and "first token" not in held_rotation


def test_rotating_a_key_without_a_token_says_why_at_once(crds, kubeconfig: str, namespace: str,
                                                         api_client) -> None:
    from kubernetes import client

    client.CustomObjectsApi(api_client).create_namespaced_custom_object(GROUP, VERSION, namespace, "apikeys", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": "early"},
        "spec": {"deploymentRef": {"name": "missing"}, "subject": "early", "environment": "dev"}})
    started = time.monotonic()
    message = failed(plugin(kubeconfig, "rotate", "early", "-n", namespace, "--timeout", "20"))
    assert time.monotonic() - started < 10
    assert "has no token to rotate yet" in message and "timed out" not in message


def test_a_context_or_kubeconfig_asked_for_that_cannot_be_used_is_an_error(kubeconfig: str, tmp_path: Path) -> None:
    """Not a fall back to the credentials of the pod the plugin runs in (a toolbox or CI pod), which would act on
    another cluster and namespace than the one asked for."""
    mistyped = failed(plugin(kubeconfig, "keys", "--context", "no-such-context"))
    assert "the kubeconfig or context asked for cannot be used" in mistyped and "no-such-context" in mistyped
    missing = failed(plugin(kubeconfig, "keys", "--kubeconfig", str(tmp_path / "absent")))
    assert "cannot be used" in missing or "could not be read" in missing


def test_unreachable_api_server_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text("apiVersion: v1\nkind: Config\ncurrent-context: gone\nclusters:\n- name: gone\n  cluster:\n"
                      "    server: https://127.0.0.1:1\ncontexts:\n- name: gone\n  context: {cluster: gone, user: u}\n"
                      "users:\n- name: u\n  user: {token: abc}\n")
    result = plugin(str(config), "keys")
    assert "cannot reach the API server at https://127.0.0.1:1" in failed(result)


@pytest.mark.parametrize(("content", "message"), [
    ("apiVersion: v1\nusers:\n- name: u\n  user: {token: \"s3cr3t-token\n", "is not valid YAML at line 5, column 1"),
    ("- just\n- a list\n", "is not a kubeconfig (a mapping of clusters, users and contexts)"),
])
def test_a_broken_kubeconfig_is_one_clear_error_that_quotes_none_of_it(tmp_path: Path, content: str,
                                                                      message: str) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(content)
    error = failed(plugin(str(config), "keys"))
    assert message in error and "s3cr3t" not in error
    assert "could not be read (Is a directory" in failed(plugin(str(tmp_path), "keys"))


def test_a_reader_that_leaves_early_gets_no_traceback(crds, kubeconfig: str, namespace: str) -> None:
    """`kubectl deepseek keys | head -1`: the reader is gone before the plugin writes; it stops quietly."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    try:
        result = subprocess.run([str(PLUGIN), "keys", "-n", namespace], env=env, stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=180)
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr
