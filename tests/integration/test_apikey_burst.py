"""What keeps a burst of new ApiKeys cheap, counted by the operator itself (its liveness endpoint's probes): a new
key is reconciled once, from the watch event (no GET of the key), and its Secret is created by one POST (no GET
first), with no Event; with the chart's admission policy the API server puts the finalizer on a new key, and the
operator's finalizer PATCH goes too; a key whose deployment appears later is woken by it instead of waiting out its
back-off."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import FAST_OPERATOR_ENV, GROUP, REPO, VERSION, OperatorProcess, wait_for

from devcluster.testing.admission import FINALIZER, chart_admission_policy, wait_for_apikey_admission_policy

KEYS = 5
# kopf runs the probes again only when their last answer is this old.
PROBE_MAX_AGE = 10.5
# Long enough that nothing here is reconciled by the schedule (drift checks, retries, issuer checks) during a test:
# only watch events and the deployment's wake-up can cause a reconcile.
QUIET_ENV = {**FAST_OPERATOR_ENV, "DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL": "10m",
             "DEEPSEEK_OPERATOR_ISSUER_CHECK_INTERVAL": "10m", "DEEPSEEK_OPERATOR_RETRY_INTERVAL": "10m"}


APIKEY_POOLS = {"apikey", "issue", "secret-watch"}  # the operator's workers for ApiKeys (kube.request_pool)


class ProbedOperator(OperatorProcess):
    """The operator with its liveness endpoint on a free local port (the probes carry its counters)."""

    def __init__(self, kubeconfig: str, env: dict[str, str]) -> None:
        super().__init__(kubeconfig, env)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/healthz"
        self.read_at = 0.0

    def start(self, failpoint: str | None = None) -> None:
        assert failpoint is None
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deepseek_operator", "--all-namespaces", "--liveness", self.url,
                 "--log-format", "plain"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.starts += 1

    def counters(self) -> tuple[Counter[str], Counter[str]]:
        """(reconciles by kind, API requests by `VERB resource` sent for ApiKeys), run afresh (not kopf's cached
        answer). Requests of DeepSeekDeployments' reconciles (pool `reconcile`: a deployment's first rollout reads
        and writes its signing-key and record-key Secrets) are left out: they are not what a key costs, and they can
        fall between two reads when a test runs alone."""
        time.sleep(max(0.0, self.read_at + PROBE_MAX_AGE - time.time()))

        def answer() -> dict | None:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    return json.loads(response.read())
            except OSError:
                return None

        probes = wait_for("the operator's liveness endpoint", answer, 60)
        self.read_at = time.time()
        requests: Counter[str] = Counter()
        for pool_kind, count in probes["api_requests_by_pool"].items():
            pool, _, kind = pool_kind.partition(" ")
            if pool in APIKEY_POOLS:
                requests[kind] += count
        return Counter(probes["reconciles"]), requests

    def settled_counters(self, timeout: float = 180) -> tuple[Counter[str], Counter[str]]:
        """The counters once no ApiKey has been reconciled between two reads: the keys of an earlier test's
        namespace (deleted at its teardown, or left by an earlier module's operator) are finalized by then."""
        deadline = time.monotonic() + timeout
        last = self.counters()
        while True:
            now = self.counters()
            changed = {kind for kind in set(now[0]) | set(last[0])
                       if kind.startswith("ApiKey") and now[0][kind] != last[0][kind]}
            if not changed:
                return now
            assert time.monotonic() < deadline, f"ApiKeys still reconciled after {timeout:.0f} s: {now[0] - last[0]}"
            last = now


@pytest.fixture(scope="module")
def operator_class() -> type[OperatorProcess]:
    return ProbedOperator


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return dict(QUIET_ENV)


def settled(world, operator: ProbedOperator) -> tuple[Counter[str], Counter[str]]:
    """The counters once earlier tests' namespaces are gone (their keys finalized) and no key is reconciled."""
    wait_for("earlier tests' namespaces to be deleted", lambda: not [
        ns for ns in world.core.list_namespace().items
        if ns.status.phase == "Terminating" and ns.metadata.name != world.namespace], 180)
    return operator.settled_counters()


def test_a_new_key_is_reconciled_once_and_its_secret_created_by_one_post(world, operator):
    # A key made before its deployment is issued when the deployment's first reconcile wakes it: once it is Ready,
    # that reconcile (which wakes every key of the deployment) is over and the counted keys find the issuer ready.
    world.create_apikey("warm-up")
    world.wait_condition("warm-up", "Ready", "False", "DeploymentNotFound", timeout=60)
    world.apply_deployment()
    world.wait_ready("warm-up", 60)
    reconciles_before, requests_before = settled(world, operator)

    for index in range(KEYS):
        world.create_apikey(f"key-{index}")
    for index in range(KEYS):
        world.wait_ready(f"key-{index}", 60)
        assert world.token(f"key-{index}")
    reconciles_after, requests_after = operator.counters()
    reconciles, requests = reconciles_after - reconciles_before, requests_after - requests_before

    apikey_reconciles = {kind: n for kind, n in reconciles.items() if kind.startswith("ApiKey")}
    wakes = [line for line in operator.log_text().splitlines() if "re-checking" in line or "Handler" in line]
    assert apikey_reconciles == {"ApiKey first issuance": KEYS}, (reconciles, wakes)
    assert requests["GET apikeys"] == 0, requests  # reconciled from the watch event's object
    assert requests["PATCH apikeys"] == KEYS, requests  # the finalizer, before any token exists
    assert requests["POST secrets"] == KEYS, requests
    assert requests["PUT apikeys/status"] == KEYS, requests
    assert [e.reason for name in (f"key-{i}" for i in range(KEYS)) for e in world.events(name)] == []


@pytest.fixture
def admission_policy(world, kubeconfig):
    """The chart's policy in the API server for this test's namespace only, until the test ends."""
    kubectl = str(Path(sys.executable).with_name("kubectl"))
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    policy = chart_admission_policy(world.namespace)
    subprocess.run([kubectl, "apply", "-f", "-"], input=policy, text=True, check=True, env=env, capture_output=True)
    wait_for_apikey_admission_policy(world.custom, world.namespace)
    yield
    subprocess.run([kubectl, "delete", "--ignore-not-found", "-f", "-"], input=policy, text=True, check=True,
                   env=env, capture_output=True)


def test_with_the_charts_admission_policy_a_new_key_costs_two_writes(world, operator, admission_policy):
    world.create_apikey("warm-up")
    world.apply_deployment()
    world.wait_ready("warm-up", 60)
    reconciles_before, requests_before = settled(world, operator)

    created = [world.create_apikey(f"key-{index}") for index in range(KEYS)]
    # The API server stored each key with the finalizer, before the operator saw it; finalizers of others stay.
    assert all(key["metadata"]["finalizers"] == [FINALIZER] for key in created), created
    with_other = world.custom.create_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey",
        "metadata": {"name": "other-finalizer", "finalizers": ["example.com/keep"]},
        "spec": {"deploymentRef": {"name": "chat"}, "subject": "other", "environment": "dev"}})
    assert with_other["metadata"]["finalizers"] == ["example.com/keep", FINALIZER]
    for index in range(KEYS):
        world.wait_ready(f"key-{index}", 60)
        assert world.verify(world.token(f"key-{index}"))["jti"] == world.apikey(f"key-{index}")["status"]["tokenId"]
    world.wait_ready("other-finalizer", 60)
    reconciles_after, requests_after = operator.counters()
    reconciles, requests = reconciles_after - reconciles_before, requests_after - requests_before

    assert {kind: n for kind, n in reconciles.items() if kind.startswith("ApiKey")} == {
        "ApiKey first issuance": KEYS + 1}, reconciles
    assert requests["PATCH apikeys"] == 0, requests  # no finalizer to add
    assert requests["POST secrets"] == KEYS + 1 and requests["PUT apikeys/status"] == KEYS + 1, requests
    assert requests["GET apikeys"] == 0 and requests["GET secrets"] == 0, requests

    # The finalizer put there by the API server works as the operator's own: deletion revokes, then releases.
    jti = world.apikey("key-0")["status"]["tokenId"]
    world.delete_apikey("key-0")
    wait_for("key-0 to be released", lambda: world.apikey("key-0") is None, 60)
    assert jti in world.auth()["revoked"]
    world.custom.patch_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", "other-finalizer",
                                                {"metadata": {"finalizers": [FINALIZER]}})


def test_a_key_created_before_its_deployment_is_issued_when_the_deployment_appears(world, operator):
    world.create_apikey("early", deployment="later")
    world.wait_condition("early", "Ready", "False", "DeploymentNotFound", timeout=60)
    # Its next look on its own is a retry interval (10 minutes here) away: only the deployment's wake-up helps.
    world.apply_deployment("later")
    world.wait_ready("early", 60)
    assert world.token("early")
    # The Secret holds the token status records, signed for the deployment that appeared.
    assert world.verify(world.token("early"), deployment="later")["jti"] == world.apikey("early")["status"]["tokenId"]


def test_a_secret_name_in_use_is_read_after_the_create_fails_and_never_overwritten(world, operator):
    world.apply_deployment()
    world.core.create_namespaced_secret(world.namespace, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "taken-apikey"}, "stringData": {"api-key": "x"}})
    world.create_apikey("taken")
    world.wait_condition("taken", "Ready", "False", "SecretNameTaken", timeout=60)
    secret = world.core.read_namespaced_secret("taken-apikey", world.namespace)
    assert not secret.metadata.owner_references and secret.data == {"api-key": "eA=="}


def test_a_deployment_edit_wakes_its_keys_only_when_it_changes_what_they_hold(world, operator):
    # Keys hold the deployment's signing key, default limits and default scopes. An edit of anything else (a
    # rollout, a scale) must not reconcile a thousand keys; a new default scope must reach the keys without their own.
    # Made before the deployment, the keys are issued by the wake-up of its creation: once they are Ready, that
    # wake-up (the one expected) is over.
    for name in ("plain-0", "plain-1"):
        world.create_apikey(name, deployment="edited")
        world.wait_condition(name, "Ready", "False", "DeploymentNotFound", timeout=60)
    world.apply_deployment("edited")
    for name in ("plain-0", "plain-1"):
        world.wait_ready(name, 60)
    before, _ = settled(world, operator)

    def edit(patch: dict) -> None:
        updated = world.custom.patch_namespaced_custom_object(GROUP, VERSION, world.namespace, "deepseekdeployments",
                                                              "edited", {"spec": patch})
        generation = updated["metadata"]["generation"]
        wait_for("the operator to see the edit", lambda: any(
            c.get("observedGeneration") == generation
            for c in (world.deployment("edited").get("status") or {}).get("conditions") or []), 60)

    edit({"replicas": 2})
    edit({"rollout": {"revisionHistoryLimit": 5}})
    after, _ = operator.counters()
    assert {kind: n for kind, n in (after - before).items() if kind.startswith("ApiKey")} == {}, after - before

    edit({"auth": {"defaultScopes": ["model:predict", "history:read"]}})
    for name in ("plain-0", "plain-1"):
        wait_for(f"{name}'s token to carry the new default scope", lambda name=name: "history:read" in str(
            world.verify(world.token(name), deployment="edited").get("scope", "")), 60)
