"""Keys at rest cost (almost) nothing, counted by the operator itself (its liveness endpoint's probes): its Secret
watch (metadata only) wakes a key whose Secret someone else edits or deletes, so no timer reads each Secret, an idle
operator sends next to no API requests, and a restart re-verifies every key without reading or writing its Secret.

The drift check interval is short here (5 s): an operator that still read each key's Secret on that timer would send
requests all through the idle window below."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest
from conftest import GROUP, REPO, VERSION, wait_for
from test_apikey_burst import QUIET_ENV, ProbedOperator

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KEYS = 4
RESTART_KEYS = 12
IDLE_WINDOW = 40.0
# Writes a restart must not make, by `VERB resource` (the operator's own counting).
WRITES = ("POST", "PUT", "PATCH", "DELETE")
KEY_RESOURCES = ("secrets", "configmaps", "apikeys", "apikeys/status")
RECONCILE_POOLS = ("apikey", "issue", "reconcile", "secret-watch")


@pytest.fixture(scope="module")
def operator_class() -> type[ProbedOperator]:
    return ProbedOperator


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    # Two workers: the ApiKey pool then has two threads, and each may settle the deployment's issuer once after a
    # start (a read of its signing keys and auth ConfigMap), a fixed cost below the per-key reads counted here.
    return {**QUIET_ENV, "DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL": "5s", "DEEPSEEK_OPERATOR_WORKERS": "2"}


@pytest.fixture(autouse=True)
def keys_finalized_before_the_next_test(world):
    """Each test's keys are deleted (and finalized by this module's operator) before the next test or module starts,
    so no later operator spends its first reconciles, counted by other tests, on them."""
    yield
    for item in world.custom.list_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys")["items"]:
        world.delete_apikey(item["metadata"]["name"])
    wait_for("this test's keys finalized", lambda: not world.custom.list_namespaced_custom_object(
        GROUP, VERSION, world.namespace, "apikeys")["items"], 120)


def probes(operator: ProbedOperator) -> dict:
    """Every probe, run afresh (kopf caches their answers for 10 s)."""
    time.sleep(max(0.0, operator.read_at + 10.5 - time.time()))
    try:
        with urllib.request.urlopen(operator.url, timeout=10) as response:
            answer = json.loads(response.read())
    except OSError:  # not listening (yet)
        return {}
    operator.read_at = time.time()
    return answer


def pools(answer: dict) -> Counter[str]:
    """API requests by the operator's pool that sent them (`apikey`, `issue`, `secret-watch`, `reconcile`)."""
    return Counter({pool: sum(n for kind, n in answer["api_requests_by_pool"].items() if kind.split()[0] == pool)
                    for pool in {kind.split()[0] for kind in answer["api_requests_by_pool"]}})


def ready_keys(world, count: int) -> list[str]:
    world.apply_deployment()
    names = [f"rest-{index}" for index in range(count)]
    for name in names:
        world.create_apikey(name)
    for name in names:
        world.wait_ready(name, 90)
    return names


def wait_watch_synced(operator: ProbedOperator) -> dict:
    return wait_for("the operator's Secret watch in sync",
                    lambda: (answer := probes(operator)).get("apikey_secret_watch", {}).get("synced") and answer, 90)


class NamespacedOperator(ProbedOperator):
    """A second operator, scoped to one namespace (`--namespace`)."""

    def __init__(self, kubeconfig: str, env: dict[str, str], namespace: str) -> None:
        super().__init__(kubeconfig, env)
        self.namespace = namespace

    def start(self, failpoint: str | None = None) -> None:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deepseek_operator", "--namespace", self.namespace, "--liveness", self.url,
                 "--log-format", "plain"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def test_the_secret_watch_is_in_sync_where_there_are_no_keys_yet(kubeconfig, namespace, operator, operator_env):
    # An empty metadata listing (`"items": null`) is a listing too: a new install must not poll Secrets for want of one.
    scoped = NamespacedOperator(kubeconfig, operator_env, namespace)
    scoped.start()
    try:
        answer = wait_for("the namespaced operator's Secret watch in sync", lambda: (
            (a := probes(scoped)).get("apikey_secret_watch", {}).get("synced") and a), 60)
        assert answer["apikey_secret_watch"]["secrets"] == 0, answer
    finally:
        scoped.stop()
    assert "broke" not in scoped.log_text(), scoped.log_text()[-2000:]


@pytest.mark.parametrize("damage", ["delete", "tamper"])
def test_a_secret_changed_by_someone_else_is_repaired_by_the_watch(world, operator, damage):
    [name] = ready_keys(world, 1)
    wait_watch_synced(operator)
    operator.settled_counters()  # no reconcile of the key under way (it would read the damaged Secret on its own)
    before = world.apikey(name)["status"]["tokenId"]
    old_token = world.token(name)
    if damage == "delete":
        world.core.delete_namespaced_secret(f"{name}-apikey", world.namespace)
    else:
        forged = base64.b64encode(b"eyJhbGciOiJub25lIn0.e30.").decode()
        world.core.patch_namespaced_secret(f"{name}-apikey", world.namespace, {"data": {"api-key": forged}})

    def repaired() -> bool:
        token = world.token(name)
        status = world.apikey(name)["status"]
        return bool(token and token != old_token and status["tokenId"] != before and not status.get("pendingToken")
                    and world.verify(token)["jti"] == status["tokenId"])

    wait_for("a new token in the damaged Secret", repaired, 60)
    # The old token is revoked, and the repair came from the watch, not a timer.
    assert before in world.auth()["revoked"]
    assert f"Secret {world.namespace}/{name}-apikey of ApiKey {name} changed" in operator.log_text()


def test_an_idle_operator_with_keys_sends_almost_no_requests_for_them(world, operator):
    ready_keys(world, KEYS)
    wait_watch_synced(operator)
    operator.settled_counters()  # trailing reconciles (issuance, earlier tests' keys) are over
    before = probes(operator)
    started = time.time()
    time.sleep(IDLE_WINDOW)
    after = probes(operator)
    elapsed = time.time() - started
    sent = Counter(after["api_requests"]) - Counter(before["api_requests"])
    by_pool = pools(after) - pools(before)
    reconciles = Counter(after["reconciles"]) - Counter(before["reconciles"])
    # ApiKey work (its pools, the Secret watch): at most a watch re-opened. Reading each key's Secret every 5 s
    # would be about KEYS * 2 * elapsed / 5 requests. (The deployment, whose pods never start here, keeps polling its
    # rollout from its own pool.)
    apikey_requests = by_pool["apikey"] + by_pool["issue"] + by_pool["secret-watch"]
    assert apikey_requests <= 2, (by_pool, sent, elapsed)
    assert {kind: n for kind, n in reconciles.items() if kind.startswith("ApiKey")} == {}, reconciles
    assert sent["GET apikeys"] == 0 and sent["PUT apikeys/status"] == 0, sent


def test_a_restart_reverifies_every_key_without_reading_or_writing_secrets(world, operator, api_client):
    names = ready_keys(world, RESTART_KEYS)
    # Only this test's keys exist (other tests' namespaces are gone), so the counts below are theirs.
    wait_for("other tests' keys gone", lambda: all(
        item["metadata"]["namespace"] == world.namespace
        for item in world.custom.list_cluster_custom_object(GROUP, VERSION, "apikeys")["items"]), 120)
    statuses = {name: world.apikey(name)["status"] for name in names}
    assert all(status.get("secretResourceVersion") for status in statuses.values()), statuses
    secrets = {name: world.secret(f"{name}-apikey").metadata.resource_version for name in names}

    operator.stop()
    operator.start()
    operator.read_at = 0.0
    answer = wait_for("every key re-verified after the restart", lambda: (
        (a := probes(operator)).get("reconciles", {}).get("ApiKey", 0) >= RESTART_KEYS and a), 120)
    requests = Counter(answer["api_requests"])
    # Verified from the start-up listings (kopf's of the keys, the Secret watch's of their Secrets' metadata), not
    # read one by one: the ApiKey pool reads only what its deployment's issuer needs (its signing-key Secret and
    # the old-layout one, its auth ConfigMap), at most once per worker (two here); reading every key's Secret
    # would be RESTART_KEYS GETs of Secrets.
    key_secret_reads = sum(n for kind, n in answer["api_requests_by_pool"].items()
                           if kind in ("apikey GET secrets", "issue GET secrets"))
    assert key_secret_reads <= 4, json.dumps(answer["api_requests_by_pool"], sort_keys=True)
    assert requests["GET apikeys"] == 0 and requests["LIST secrets"] >= 1, requests
    # By the reconciles (ApiKeys' and the deployment's); not the start-up sweep, which deletes the signing keys of
    # deployments (earlier tests') deleted while no operator ran.
    writes = {kind: n for kind, n in answer["api_requests_by_pool"].items()
              if kind.split()[0] in RECONCILE_POOLS and kind.split()[1] in WRITES and kind.split()[2] in KEY_RESOURCES}
    assert writes == {}, json.dumps(answer["api_requests_by_pool"], sort_keys=True)
    assert {name: world.secret(f"{name}-apikey").metadata.resource_version for name in names} == secrets
    assert {name: world.apikey(name)["status"] for name in names} == statuses
