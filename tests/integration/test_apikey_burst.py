"""What keeps a burst of new ApiKeys cheap, counted by the operator itself (its liveness endpoint's probes): a new
key is reconciled once, from the watch event (no GET of the key), and its Secret is created by one POST (no GET
first), with no Event; a key whose deployment appears later is woken by it instead of waiting out its back-off."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest
from conftest import FAST_OPERATOR_ENV, REPO, OperatorProcess, wait_for

KEYS = 5
# kopf runs the probes again only when their last answer is this old.
PROBE_MAX_AGE = 10.5
# Long enough that nothing here is reconciled by the schedule (drift checks, retries, issuer checks) during a test:
# only watch events and the deployment's wake-up can cause a reconcile.
QUIET_ENV = {**FAST_OPERATOR_ENV, "DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL": "10m",
             "DEEPSEEK_OPERATOR_ISSUER_CHECK_INTERVAL": "10m", "DEEPSEEK_OPERATOR_RETRY_INTERVAL": "10m"}


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
        """(reconciles by kind, API requests by `VERB resource`), run afresh (not kopf's cached answer)."""
        time.sleep(max(0.0, self.read_at + PROBE_MAX_AGE - time.time()))

        def answer() -> dict | None:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    return json.loads(response.read())
            except OSError:
                return None

        probes = wait_for("the operator's liveness endpoint", answer, 60)
        self.read_at = time.time()
        return Counter(probes["reconciles"]), Counter(probes["api_requests"])


@pytest.fixture(scope="module")
def operator_class() -> type[OperatorProcess]:
    return ProbedOperator


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return dict(QUIET_ENV)


def test_a_new_key_is_reconciled_once_and_its_secret_created_by_one_post(world, operator):
    # A key made before its deployment is issued when the deployment's first reconcile wakes it: once it is Ready,
    # that reconcile (which wakes every key of the deployment) is over and the counted keys find the issuer ready.
    world.create_apikey("warm-up")
    world.wait_condition("warm-up", "Ready", "False", "DeploymentNotFound", timeout=60)
    world.apply_deployment()
    world.wait_ready("warm-up", 60)
    reconciles_before, requests_before = operator.counters()

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
