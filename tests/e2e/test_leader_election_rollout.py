"""Two operator replicas with leader election: the leader is SIGKILLed mid-rollout, the other takes over within the
lease's bound and finishes the rollout: traffic ends on the new color, switched once, with no request failing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch

from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import E2E_OPERATOR_ENV, GROUP, PLURAL, VERSION, ContinuousClient, World, wait_for
from devcluster.testing.replicas import OperatorReplica, lease_holder

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

LEASE_DURATION, RETRY_PERIOD = 15.0, 2.0
TAKEOVER_BOUND = LEASE_DURATION + 2 * RETRY_PERIOD * 1.2 + 5.0
PHASES = ["Provisioning", "Starting", "Verifying", "AwaitingPromotion", "Promoting", "PostVerifying", "Completed"]


@pytest.fixture
def replicas(e2e_crds, kubeconfig, namespace) -> Iterator[list[OperatorReplica]]:
    made = [OperatorReplica(name, kubeconfig, dict(E2E_OPERATOR_ENV), lease_namespace=namespace)
            for name in ("replica-a", "replica-b")]
    yield made
    for replica in made:
        replica.stop()
    for replica in made:
        assert "eyJ" not in replica.log_text(), f"a JWT appeared in {replica.name}'s log"


class RolloutHistory:
    """Every rollout phase the DeepSeekDeployment showed and every color the active Service selected, in order."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.phases: list[tuple[str | None, str | None]] = []   # (revision, phase), consecutive duplicates dropped
        self.colors: list[str] = []                              # active Service selector, consecutive dups dropped
        self._watches = [watch.Watch(), watch.Watch()]
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._deployment, daemon=True),
                         threading.Thread(target=self._service, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _deployment(self) -> None:
        while not self._stopped.is_set():
            try:
                for event in self._watches[0].stream(self.world.custom.list_namespaced_custom_object, GROUP, VERSION,
                                                     self.world.namespace, PLURAL, timeout_seconds=300):
                    rollout = ((event["object"].get("status") or {}).get("rollout") or {})
                    entry = (rollout.get("revision"), rollout.get("phase"))
                    if not self.phases or self.phases[-1] != entry:
                        self.phases.append(entry)
            except Exception:  # a restarted watch re-lists: the same state is not recorded twice in a row
                time.sleep(0.1)

    def _service(self) -> None:
        while not self._stopped.is_set():
            try:
                for event in self._watches[1].stream(self.world.core.list_namespaced_service, self.world.namespace,
                                                     field_selector="metadata.name=chat", timeout_seconds=300):
                    color = (event["object"].spec.selector or {}).get("deepseek.ai/color")
                    if color and (not self.colors or self.colors[-1] != color):
                        self.colors.append(color)
            except Exception:
                time.sleep(0.1)

    def phase(self) -> tuple[str | None, str | None]:
        return self.phases[-1] if self.phases else (None, None)

    def stop(self) -> None:
        self._stopped.set()
        for stream in self._watches:
            stream.stop()


def events_about(world: World, reason: str, revision: str) -> list[Any]:
    return [e for e in world.events(reason) if revision in (e.message or "")]


# Before the traffic switch (the new color is being verified) and after it (live traffic is being checked).
@pytest.mark.parametrize("kill_phase", ["Verifying", "PostVerifying"])
def test_leader_sigkilled_mid_rollout_other_replica_completes_it_once(api_client, namespace, tiny_model, replicas,
                                                                      kill_phase):
    world = World(api_client, namespace, tiny_model)
    first, second = replicas
    first.start()
    wait_for("replica-a to lead", lambda: first.holds(lease_holder(api_client, namespace)), 60)
    second.start()
    wait_for("replica-b to stand by", lambda: "standing by" in second.log_text(), 60)

    world.create()
    old = world.wait_phase("Completed", timeout=240)["activeRevision"]
    token = world.create_apikey()
    history = RolloutHistory(world)
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            ContinuousClient(proxy.url + "/v1", token) as traffic:
        world.patch({"spec": {"model": {"revision": "v2"}}})
        new = wait_for(f"the new revision in {kill_phase}", lambda: (
            revision if (revision := history.phase()[0]) not in (None, old) and history.phase()[1] == kill_phase
            else None), 240, interval=0.02)
        first.kill()
        killed = time.monotonic()
        holder = wait_for("replica-b to take over", lambda: (
            h if second.holds(h := lease_holder(api_client, namespace)) else None), TAKEOVER_BOUND + 30, interval=0.1)
        takeover = time.monotonic() - killed
        status = world.wait_phase("Completed", revision=new, timeout=240)
        completed = time.monotonic() - killed
        # the watch that records the phases delivers the last status write after a GET has seen it
        wait_for("the phase watch to see Completed", lambda: history.phase() == (new, "Completed"), 30,
                 interval=0.05)
    history.stop()
    print(f"\nSIGKILL of the leader in {kill_phase}: {holder} took over in {takeover:.1f}s "
          f"(bound {TAKEOVER_BOUND:g}s); rollout Completed {completed:.1f}s after the kill; "
          f"phases {history.phases}; service colors {history.colors}; "
          f"{traffic.ok} requests ok, {len(traffic.failures)} failed")

    assert first.exit_code == -9
    assert takeover <= TAKEOVER_BOUND
    assert status["activeColor"] == "green" and status["activeRevision"] == new
    selector = world.core.read_namespaced_service("chat", namespace).spec.selector
    assert selector["deepseek.ai/color"] == "green" and selector["deepseek.ai/revision"] == new
    # traffic switched once, blue -> green, never back
    assert history.colors == ["blue", "green"]
    # the new revision's phases only moved forward (a resumed step shows the same phase, not an earlier one)
    steps = [PHASES.index(phase) for revision, phase in history.phases if revision == new and phase in PHASES]
    assert steps == sorted(steps) and steps[-1] == PHASES.index("Completed"), history.phases
    # the rollout was not started over, and it is in the history once
    assert len(events_about(world, "RolloutStarted", new)) == 1
    assert [entry["result"] for entry in status["history"] if entry["revision"] == new] == ["Completed"]
    assert traffic.failures == [], f"{len(traffic.failures)} failed requests: {traffic.failures[:5]}"
    assert client.AppsV1Api(api_client).read_namespaced_deployment("chat-green", namespace).spec.replicas == 1
