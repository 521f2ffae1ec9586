"""Two operator replicas with leader election: the standby does nothing, the leader is SIGKILLed mid-burst and the
other takes over within the lease's bound, and every ApiKey ends Ready with its token issued exactly once."""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import jwt
import pytest
from kubernetes import client, watch

from devcluster.testing.polling import wait_for
from devcluster.testing.ports import free_port
from devcluster.testing.replicas import LEASE_NAME, OperatorReplica, lease_holder

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# The operator's (and client-go's) defaults, as the chart sets them.
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 15.0, 10.0, 2.0
# A candidate notices a silent lease one retry period (+20 % jitter) after its last change, waits the lease
# duration from then, and takes it at its next attempt; the margin covers a loaded CI machine.
TAKEOVER_BOUND = LEASE_DURATION + 2 * RETRY_PERIOD * 1.2 + 5.0
BURST = 40


@pytest.fixture
def operator(crds, kubeconfig, namespace, operator_env) -> Iterator[list[OperatorReplica]]:
    """In place of the one operator: two replicas competing for the Lease in the test's namespace (not started)."""
    made = [OperatorReplica(name, kubeconfig, dict(operator_env), lease_namespace=namespace,
                            liveness_port=free_port()) for name in ("replica-a", "replica-b")]
    yield made
    for replica in made:
        replica.stop()
    for replica in made:
        assert "eyJ" not in replica.log_text(), f"a JWT appeared in {replica.name}'s log"


def wait_leader(api_client, namespace: str, replica: OperatorReplica, timeout: float = 60) -> str:
    return wait_for(f"{replica.name} to hold the lease", lambda: (
        holder if replica.holds(holder := lease_holder(api_client, namespace)) else None), timeout)


def wait_standing_by(replica: OperatorReplica, timeout: float = 60) -> None:
    wait_for(f"{replica.name} to stand by", lambda: "standing by" in replica.log_text(), timeout)


class ForeignHolder:
    """Someone else holding the Lease and renewing it every retry period, until `stop()`."""

    def __init__(self, api_client: client.ApiClient, namespace: str, identity: str = "elsewhere_0") -> None:
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.identity = namespace, identity
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)

    @staticmethod
    def _now() -> str:
        return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def take(self) -> None:
        """Write ourselves into the Lease (creating it when absent) and keep renewing."""
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(LEASE_DURATION),
                "acquireTime": self._now(), "renewTime": self._now()}
        try:
            lease = self.api.read_namespaced_lease(LEASE_NAME, self.namespace)
        except client.ApiException as exc:
            assert exc.status == 404
            self.api.create_namespaced_lease(self.namespace, {"metadata": {"name": LEASE_NAME}, "spec": spec})
        else:
            self.api.patch_namespaced_lease(LEASE_NAME, self.namespace, {
                "metadata": {"resourceVersion": lease.metadata.resource_version}, "spec": spec})
        self._thread.start()

    def _renew(self) -> None:
        while not self._stopped.wait(RETRY_PERIOD):
            self.api.patch_namespaced_lease(LEASE_NAME, self.namespace, {"spec": {"renewTime": self._now()}})

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(10)


def healthz(port: int) -> int:
    """The liveness endpoint's status code; 0 while nothing listens (between the standby's server and kopf's)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_standby_reconciles_nothing_and_stays_live_until_the_lease_expires(api_client, namespace, world, operator):
    replicas = operator
    holder = ForeignHolder(api_client, namespace)
    holder.take()
    try:
        standby = replicas[0]
        standby.start()
        wait_standing_by(standby)
        wait_for("the standby's liveness endpoint", lambda: healthz(standby.liveness_port) == 200, 30)
        world.apply_deployment()
        world.create_apikey("early")
        # While another holds the lease, nothing of ours is touched: no finalizer, no status, no Secret.
        observed_until = time.monotonic() + 3 * RETRY_PERIOD
        while time.monotonic() < observed_until:
            key = world.apikey("early")
            assert not key.get("status") and not key["metadata"].get("finalizers"), key
            assert not (world.deployment().get("status") or {}), "the standby reconciled the deployment"
            assert world.secret("early-apikey") is None
            time.sleep(0.5)
        assert healthz(standby.liveness_port) == 200
    finally:
        holder.stop()
    silent_since = time.monotonic()
    wait_leader(api_client, namespace, standby, timeout=TAKEOVER_BOUND + 30)
    takeover = time.monotonic() - silent_since
    print(f"\ntakeover of a lease whose holder stopped renewing: {takeover:.1f}s "
          f"(lease duration {LEASE_DURATION:g}s, bound {TAKEOVER_BOUND:g}s)")
    assert takeover <= TAKEOVER_BOUND
    assert takeover >= LEASE_DURATION - RETRY_PERIOD, "the lease was taken before it expired"
    world.wait_ready("early", timeout=60)
    # kopf's own liveness endpoint answers once the replica leads
    wait_for("the leader's liveness endpoint", lambda: healthz(standby.liveness_port) == 200, 30)


def test_leader_exits_as_soon_as_another_holds_its_lease(api_client, namespace, operator):
    leader = operator[0]
    leader.start()
    wait_leader(api_client, namespace, leader)
    holder = ForeignHolder(api_client, namespace, identity="intruder_0")
    taken = time.monotonic()
    holder.take()
    try:
        wait_for("the old leader to exit", lambda: not leader.running, RETRY_PERIOD * 1.2 + 10)
        gone = time.monotonic() - taken
    finally:
        holder.stop()
    print(f"\nleader exited {gone:.1f}s after its lease was taken (retry period {RETRY_PERIOD:g}s)")
    assert leader.exit_code == 1
    assert "leader election lost" in leader.log_text() and "intruder_0" in leader.log_text()


def test_graceful_stop_hands_the_lease_over_at_once(api_client, namespace, operator):
    first, second = operator
    first.start()
    wait_leader(api_client, namespace, first)
    second.start()
    wait_standing_by(second)
    stopped = time.monotonic()
    first.stop()
    assert first.exit_code == 0, first.log_tail()
    wait_leader(api_client, namespace, second, timeout=LEASE_DURATION)
    handover = time.monotonic() - stopped
    print(f"\nhandover after SIGTERM of the leader (lease released): {handover:.1f}s")
    assert "released lease" in first.log_text()
    assert handover < LEASE_DURATION - RETRY_PERIOD, "the lease was not released; the standby waited it out"


def test_a_stop_with_a_reconcile_still_running_ends_in_bounded_time_and_hands_the_lease_over(
        api_client, namespace, world, operator):
    """SIGTERM while a rollout step is still running (held at a failpoint, as a long verification would be): the
    process ends within its stop graces instead of waiting for that step (the kubelet would SIGKILL it at the end of
    the pod's grace period); that step sends no more API requests once kopf has stopped, so the Lease is released as
    in any graceful stop, and the standby takes over at once and takes the deployment up."""
    leader, standby = operator
    leader.start(failpoint=f"rollout-none={namespace}/chat", failpoint_sleep=300)
    wait_leader(api_client, namespace, leader)
    standby.start()
    wait_standing_by(standby)
    world.apply_deployment()
    wait_for("the leader's rollout held at the failpoint", lambda: "holding it for 300 s" in leader.log_text(), 60)
    assert not (world.deployment().get("status") or {}).get("rollout"), world.deployment().get("status")
    assert leader.proc is not None
    signalled = time.monotonic()
    leader.proc.terminate()
    try:
        code = leader.proc.wait(30)
    except subprocess.TimeoutExpired:
        leader.kill()
        raise AssertionError(f"SIGTERM did not end the leader in 30 s; its log ends:\n{leader.log_tail()}") from None
    took = time.monotonic() - signalled
    print(f"\nleader with a reconcile held stopped {took:.1f}s after SIGTERM")
    assert code == 0, leader.log_tail()
    # kopf's own stop (a few seconds, 10 at most) and 5 s for the held reconcile, with room for a loaded machine
    assert took < 20, leader.log_tail()
    log = leader.log_text()
    assert "stopping with 1 reconcile(s) still running" in log and "released lease" in log, log[-3000:]
    wait_leader(api_client, namespace, standby, timeout=LEASE_DURATION - RETRY_PERIOD)
    rollout = world.wait_for("the new leader to take the deployment up", lambda: (
        (world.deployment().get("status") or {}).get("rollout")), timeout=60)
    assert rollout.get("phase"), rollout


class History:
    """Every version of the namespace's ApiKey Secrets and ApiKey token ids, through watches started up front."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        # Secret name -> [(resourceVersion, jti)] for every version that held a token
        self.secret_versions: dict[str, list[tuple[str, str]]] = defaultdict(list)
        # ApiKey name -> every status.tokenId it showed
        self.token_ids: dict[str, set[str]] = defaultdict(set)
        self._watches = [watch.Watch(), watch.Watch()]
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._secrets, daemon=True),
                         threading.Thread(target=self._apikeys, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _secrets(self) -> None:
        while not self._stopped.is_set():
            try:
                for event in self._watches[0].stream(self.core.list_namespaced_secret, self.namespace,
                                                     timeout_seconds=300):
                    secret = event["object"]
                    if secret.data and "api-key" in secret.data:
                        token = base64.b64decode(secret.data["api-key"]).decode()
                        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
                        versions = self.secret_versions[secret.metadata.name]
                        if (secret.metadata.resource_version, jti) not in versions:
                            versions.append((secret.metadata.resource_version, jti))
            except Exception:  # a restarted watch re-lists; versions already seen are not counted twice
                time.sleep(0.1)

    def _apikeys(self) -> None:
        while not self._stopped.is_set():
            try:
                for event in self._watches[1].stream(self.custom.list_namespaced_custom_object, "deepseek.ai",
                                                     "v1alpha1", self.namespace, "apikeys", timeout_seconds=300):
                    obj = event["object"]
                    token_id = (obj.get("status") or {}).get("tokenId")
                    if token_id:
                        self.token_ids[obj["metadata"]["name"]].add(token_id)
            except Exception:
                time.sleep(0.1)

    def issued(self) -> int:
        """How many Secrets have held a token so far."""
        return sum(1 for versions in list(self.secret_versions.values()) if versions)

    def stop(self) -> None:
        self._stopped.set()
        for stream in self._watches:
            stream.stop()


def test_leader_sigkilled_mid_burst_other_replica_finishes_every_key_once(api_client, namespace, world, operator):
    first, second = operator
    first.start()
    wait_leader(api_client, namespace, first)
    second.start()
    wait_standing_by(second)
    history = History(api_client, namespace)
    time.sleep(0.5)  # both watches are open before the first object exists
    names = [f"burst-{index:02d}" for index in range(BURST)]

    def create_all() -> None:
        for name in names:
            world.create_apikey(name)

    world.apply_deployment()
    creator = threading.Thread(target=create_all, daemon=True)
    creator.start()
    wait_for(f"{BURST // 4} issued tokens", lambda: history.issued() >= BURST // 4, 90, interval=0.01)
    first.kill()
    killed = time.monotonic()
    issued_before = history.issued()
    holder = wait_for("the other replica to hold the lease", lambda: (
        h if second.holds(h := lease_holder(api_client, namespace)) else None), TAKEOVER_BOUND + 30, interval=0.1)
    takeover = time.monotonic() - killed
    creator.join(60)
    for name in names:
        world.wait_ready(name, timeout=120)
    all_ready = time.monotonic() - killed
    time.sleep(2 * RETRY_PERIOD)  # late writes by anyone would show in the history now
    history.stop()
    versions = sum(len(v) for v in history.secret_versions.values())
    print(f"\nSIGKILL of the leader after {issued_before}/{BURST} tokens: {holder} took over in {takeover:.1f}s "
          f"(bound {TAKEOVER_BOUND:g}s); all {BURST} keys Ready {all_ready:.1f}s after the kill; "
          f"{versions} Secret versions with a token seen for {BURST} keys")

    assert first.exit_code == -9
    assert issued_before < BURST, "the kill came after the burst: nothing was tested"
    assert takeover <= TAKEOVER_BOUND
    for name in names:
        key = world.apikey(name)
        token = world.token(name)
        assert token is not None, f"{name} has no token"
        claims = world.verify(token)
        secret_jtis = {jti for _, jti in history.secret_versions[f"{name}-apikey"]}
        assert secret_jtis == {claims["jti"]}, f"{name}'s Secret held {len(secret_jtis)} tokens"
        assert history.token_ids[name] == {key["status"]["tokenId"]} == {claims["jti"]}, \
            f"{name}'s status named tokens {sorted(history.token_ids[name])}"
    assert "standing by" in second.log_text()


def test_a_stop_asked_for_as_the_lease_is_taken_hands_it_back(api_client, namespace, kubeconfig, monkeypatch):
    """SIGTERM while a replica takes the Lease (a pod deleted as it wins): it releases the Lease and stops, instead
    of leading with the signal gone until the kubelet kills it, while the other replica waits out the Lease."""
    import os
    import signal

    from deepseek_operator import __main__ as operator_main
    from deepseek_operator.leader_election import LeaderElector
    from deepseek_operator.settings import OperatorSettings

    take = LeaderElector.try_acquire_or_renew

    def taken_then_stopped(self):
        taken = take(self)  # a real update of the Lease on the API server
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the standby's own handler
        return taken

    monkeypatch.setattr(LeaderElector, "try_acquire_or_renew", taken_then_stopped)
    settings = OperatorSettings(kubeconfig=kubeconfig, leader_election=True, leader_election_namespace=namespace,
                                leader_election_lease_name="stop-while-taking", liveness_endpoint=None)
    elector = LeaderElector.connect(settings.leader_election_config("replica-stopped"), kubeconfig)
    try:
        assert operator_main.wait_for_leadership(elector, None) is False
    finally:
        elector.close()
    assert lease_holder(api_client, namespace, "stop-while-taking") is None
