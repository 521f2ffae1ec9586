"""SIGKILL the operator at exact steps of a reconcile (failpoints) and at random: no duplicate, no lost revocation."""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import defaultdict

import jwt
import pytest
from kubernetes import client, watch

from devcluster.testing.polling import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class SecretTokens:
    """Every token ever written to a Secret in the namespace, seen through one unbroken watch.

    The watch resumes from the last resourceVersion it saw, so no write falls into a gap between two streams; any
    error of the watch (a 410 Gone included: writes would be lost) is kept, and `jtis` fails on it."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.events = 0
        self.errors: list[str] = []
        self._core = client.CoreV1Api(api_client)
        self._namespace = namespace
        self._watch = watch.Watch()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        resource_version: str | None = None
        while not self._stopped.is_set():
            try:
                for event in self._watch.stream(self._core.list_namespaced_secret, self._namespace,
                                                resource_version=resource_version, timeout_seconds=300):
                    secret = event["object"]
                    resource_version = secret.metadata.resource_version
                    self.events += 1
                    if secret.data and "api-key" in secret.data:
                        self.seen[secret.metadata.name].add(base64.b64decode(secret.data["api-key"]).decode())
            except Exception as exc:  # kept and reported by jtis(): a broken watch may have missed tokens
                if not self._stopped.is_set():
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:500])
                return

    def jtis(self, secret_name: str) -> set[str]:
        assert not self.errors, f"the Secret watch broke, tokens may be missing: {self.errors}"
        return {jwt.decode(t, options={"verify_signature": False})["jti"] for t in self.seen[secret_name]}

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()


@pytest.fixture
def secrets(api_client, namespace):
    tokens = SecretTokens(api_client, namespace)
    # the watch is open once it reports a Secret created after it started
    client.CoreV1Api(api_client).create_namespaced_secret(namespace, {"metadata": {"name": "watch-started"}})
    wait_for("the Secret watch to start", lambda: tokens.events or tokens.errors, timeout=60)
    assert not tokens.errors, tokens.errors
    yield tokens
    tokens.stop()
    assert not tokens.errors, f"the Secret watch broke during the test: {tokens.errors}"


def crash_at(operator, failpoint: str, world, name: str) -> None:
    """Restart the operator so that it SIGKILLs itself when a reconcile of ApiKey `name` reaches `failpoint`."""
    operator.stop()
    point, _, count = failpoint.partition("@")
    operator.start(failpoint=f"{point}{'@' + count if count else ''}={world.namespace}/{name}")


def wait_killed(operator) -> None:
    assert operator.wait_exit(120) == -9, "the failpoint was not reached"


def test_killed_after_recording_a_replacement_issues_exactly_one_replacement(world, operator, secrets):
    world.apply_deployment()
    crash_at(operator, "apikey:after-pending", world, "a")
    world.create_apikey("a", duration="20s", renewBefore="10s", gracePeriod="8s")
    first = world.wait_ready("a")["status"]["tokenId"]
    wait_killed(operator)  # at the renewal, after recording the new token id, before writing the Secret
    pending = world.apikey("a")["status"]["pendingToken"]["tokenId"]
    assert world.verify(world.token("a"))["jti"] == first
    operator.start()
    status = world.wait_for("rotation settled", lambda: (s := world.wait_ready("a")["status"])["revision"] == 2 and s)
    assert status["tokenId"] not in (first, pending)
    assert pending in world.auth()["revoked"], "the never-delivered token id is revoked anyway"
    assert [p["tokenId"] for p in status["previousTokens"]] == [first], "the old token keeps its grace period"
    assert secrets.jtis("a-apikey") == {first, status["tokenId"]}


# After the Secret write, and (a first issuance defers its status) before the status write: either way the token is in
# use already, and the restarted operator adopts it instead of replacing it.
@pytest.mark.parametrize(("failpoint", "name"), [("apikey:after-secret", "b"), ("apikey:before-deferred-status", "d")])
def test_killed_after_writing_a_first_token_adopts_it_instead_of_issuing_again(world, operator, secrets, failpoint,
                                                                                name):
    world.apply_deployment()
    crash_at(operator, failpoint, world, name)
    world.create_apikey(name)
    wait_killed(operator)
    written = jwt.decode(world.token(name), options={"verify_signature": False})["jti"]
    assert "tokenId" not in (world.apikey(name).get("status") or {})
    operator.start()
    status = world.wait_ready(name)["status"]
    assert status["tokenId"] == written and status["revision"] == 1
    assert world.auth()["revoked"] == {}
    assert secrets.jtis(f"{name}-apikey") == {written}
    assert world.verify(world.token(name))["jti"] == written


def test_killed_after_writing_a_first_token_then_revoked_still_revokes_it(world, operator):
    world.apply_deployment()
    crash_at(operator, "apikey:after-secret", world, "b2")
    world.create_apikey("b2")
    wait_killed(operator)
    written = jwt.decode(world.token("b2"), options={"verify_signature": False})["jti"]
    world.patch_apikey("b2", {"revoked": True})
    operator.start()
    world.wait_condition("b2", "Ready", "False", "Revoked")
    assert written in world.auth()["revoked"], "a token status never recorded is still revoked"


def test_killed_mid_rotation_keeps_the_grace_period_of_the_old_token(world, operator, secrets):
    world.apply_deployment()
    crash_at(operator, "apikey:after-secret@2", world, "c")
    world.create_apikey("c", duration="20s", renewBefore="10s", gracePeriod="8s")
    first = world.wait_ready("c")["status"]["tokenId"]
    wait_killed(operator)
    operator.start()
    status = world.wait_for("rotation settled", lambda: (s := world.wait_ready("c")["status"])["revision"] == 2 and s)
    assert [p["tokenId"] for p in status["previousTokens"]] == [first]
    assert first not in world.auth()["revoked"]
    world.wait_for("old token revoked after grace", lambda: first in world.auth()["revoked"], timeout=15)
    assert secrets.jtis("c-apikey") == {first, status["tokenId"]}


def test_killed_after_revoking_by_flag_finishes_the_revocation(world, operator):
    world.apply_deployment()
    world.create_apikey("d")
    token_id = world.wait_ready("d")["status"]["tokenId"]
    crash_at(operator, "apikey:after-auth-commit", world, "d")
    world.patch_apikey("d", {"revoked": True})
    wait_killed(operator)
    assert token_id in world.auth()["revoked"]
    operator.start()
    world.wait_condition("d", "Ready", "False", "Revoked")
    world.wait_for("Secret deleted", lambda: world.secret("d-apikey") is None)


def test_killed_while_finalizing_a_deleted_key_still_revokes_and_releases_it(world, operator):
    world.apply_deployment()
    world.create_apikey("e")
    token_id = world.wait_ready("e")["status"]["tokenId"]
    crash_at(operator, "apikey:finalize-after-auth-commit", world, "e")
    world.delete_apikey("e")
    wait_killed(operator)
    assert world.apikey("e") is not None, "the finalizer holds the key until revocation is done"
    operator.start()
    world.wait_for("ApiKey released", lambda: world.apikey("e") is None)
    assert token_id in world.auth()["revoked"]


def test_random_sigkills_during_a_busy_minute_leave_every_token_accounted_for(world, operator, secrets):
    rng = random.Random(7)
    world.apply_deployment()
    names = [f"r{i}" for i in range(16)]
    for name in names[:8]:
        world.create_apikey(name)
    time.sleep(rng.uniform(0.2, 0.6))
    operator.kill()
    operator.start()
    for name in names[8:]:
        world.create_apikey(name)
    ready = {name: world.wait_ready(name, timeout=40)["status"]["tokenId"] for name in names[:6]}
    for name in names[:4]:
        world.patch_apikey(name, {"revoked": True})
    for name in names[4:6]:
        world.delete_apikey(name)
    time.sleep(rng.uniform(0.05, 0.3))
    operator.kill()
    operator.start()
    time.sleep(rng.uniform(0.3, 0.8))
    operator.kill()
    operator.start()

    for name in names[:4]:
        world.wait_condition(name, "Ready", "False", "Revoked", timeout=40)
    for name in names[4:6]:
        world.wait_for(f"{name} deleted", lambda n=name: world.apikey(n) is None, timeout=40)
    current = {name: world.wait_ready(name, timeout=40)["status"]["tokenId"] for name in names[6:]}
    revoked = world.auth()["revoked"]
    # Every revoked or deleted key's token is in the revoked list.
    for name in names[:6]:
        assert ready[name] in revoked, name
    # Every token that ever reached a Secret is either the key's current one or revoked: nothing issued twice
    # stays valid, whatever the operator was doing when it was killed.
    for name in names:
        for token_id in secrets.jtis(f"{name}-apikey"):
            assert token_id == current.get(name) or token_id in revoked, (name, token_id)
    for name, token_id in current.items():
        assert world.verify(world.token(name))["jti"] == token_id
