"""Rollback after a post-switch error rise: a revision whose server answers the operator's smoke requests (so it
passes pre-switch verification and gets traffic) and then fails every request. The operator reads the rise from the
real server's /metrics and sends traffic back to the color it kept warm.

devcluster runs the `deepseek-server-flaky` image as `devcluster.flaky_server`: the real server whose engine fails
with a 500 after its first `ANSWERED_BEFORE_FAILING` requests.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from claims_support import assert_spec_untouched, manager_of

from devcluster.flaky_server import ANSWERED_BEFORE_FAILING
from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import ContinuousClient, World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

FLAKY_IMAGE = "deepseek-server-flaky:e2e"


@pytest.mark.parametrize("stream", [False, True], ids=["unstreamed", "streamed"])
def test_an_error_rise_after_the_switch_rolls_back_to_the_warm_color(world: World, stream: bool) -> None:
    """Streamed, the flaky server's failures come after their 200, as error events: they are counted as the 500s
    they are (they were counted as 200s, and the revision that failed every stream was kept)."""
    # every revision, the first too, is watched for windowSeconds after its switch
    analysis = {"requests": 2, "windowSeconds": 60, "maxLatencyMs": 20000, "maxErrorRate": 0.05}
    assert analysis["requests"] < ANSWERED_BEFORE_FAILING  # the smoke requests are answered
    created = world.create(rollout={"progressDeadlineSeconds": 240, "scaleDownDelaySeconds": 600,
                                    "analysis": analysis})
    status = world.wait_phase("Completed", timeout=400)
    first, warm = status["activeRevision"], status["activeColor"]
    token = world.create_apikey()

    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            ContinuousClient(proxy.url + "/v1", token, stream=stream) as traffic:
        wait_for("traffic through the Service", lambda: traffic.ok >= 3, 60)
        failures_before_switch = len(traffic.failures)
        world.patch({"spec": {"image": FLAKY_IMAGE}})
        second = wait_for("the flaky revision's rollout", lambda: (rollout := world.status().get("rollout") or {})
                          .get("revision") not in (None, first) and rollout["revision"], 60)

        # it passes pre-switch verification and gets the traffic; then its errors, counted by the real server and
        # read from its /metrics, roll it back (PostVerifying may last only seconds: it is recorded when seen)
        seen_analysis: list[dict[str, Any]] = []

        def rolled_back() -> dict[str, Any] | None:
            current = world.status()
            rollout = current.get("rollout") or {}
            if rollout.get("phase") == "PostVerifying" and (rollout.get("analysis") or {}).get("stage"):
                seen_analysis.append(rollout["analysis"])
            return current if rollout.get("phase") == "Degraded" and rollout.get("revision") == second else None

        status = wait_for("the rollback after the error rise", rolled_back, 400, interval=0.3)
        new_color = status["rollout"]["color"]
        assert new_color != warm
        assert [e for e in world.events("Verified") if second in (e.message or "")], "no Verified event for it"
        assert [e for e in world.events("Promoted") if second in (e.message or "") and new_color in (
            e.message or "")], "traffic was never switched to it"
        assert status["activeColor"] == warm and status["activeRevision"] == first
        assert status["failedRevision"] == second
        degraded = world.condition("Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "PostVerificationFailed", degraded
        assert status["rollout"]["reason"] == "PostVerificationFailed"
        # "error rate 50.0% (5/10) on green ...": the counts the operator read from the flaky server's /metrics
        counted = re.search(r"error rate [0-9.]+% \((\d+)/(\d+)\) on (\w+)", degraded["message"])
        assert counted, degraded["message"]
        errors, requests = int(counted.group(1)), int(counted.group(2))
        assert counted.group(3) == new_color and requests >= 10 and errors >= 1, degraded["message"]
        if seen_analysis:  # only when a status read fell inside PostVerifying
            assert seen_analysis[-1]["stage"] == "PostVerifying" and seen_analysis[-1]["requests"] >= 1
        assert world.condition("Ready")["status"] == "True"
        assert world.events("RolledBack")
        service = world.core.read_namespaced_service("chat", world.namespace)
        assert service.spec.selector["deepseek.ai/color"] == warm
        assert service.spec.selector["deepseek.ai/revision"] == first

        # the warm color serves again: once the proxy follows the switch back, no request fails
        ok_after = traffic.ok
        wait_for("answers after the rollback", lambda: traffic.ok >= ok_after + 5, 60)
        settled_failures, settled_ok = len(traffic.failures), traffic.ok
        wait_for("more answers from the warm color", lambda: traffic.ok >= settled_ok + 10, 60)
        assert traffic.failures[settled_failures:] == [], traffic.failures[settled_failures:][:5]

    failed = traffic.failures[failures_before_switch:]
    assert failed, "the flaky color never failed a client request: the test proved nothing"
    # unstreamed a 500; streamed the error event the openai client raises as an APIError
    failure = "APIError: The model failed while generating" if stream else "InternalServerError"
    assert all(f.startswith(failure) for f in failed), failed[:5]
    assert traffic.failures[:failures_before_switch] == [], traffic.failures[:5]
    print(f"\npost-switch rollback: {len(failed)} client request(s) failed on the flaky color before traffic went "
          f"back; the operator counted {errors}/{requests} server errors; {traffic.ok} answered in all")
    assert_spec_untouched(world.get(), manager_of(created), 2)
