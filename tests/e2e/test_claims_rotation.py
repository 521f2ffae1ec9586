"""Rotation without downtime, under traffic: an ApiKey with a lifetime of a minute rotates several times while clients
that re-read the key from its Secret keep sending through the Service. The current token is never refused; the
previous one keeps working through `gracePeriod` and is refused after it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import pytest
from claims_support import (
    assert_no_token_in,
    assert_spec_untouched,
    call_models,
    create_apikey,
    event_messages,
    get_apikey,
    manager_of,
    refused,
    secret_token,
    server_logs,
    server_pod_ips,
    token_id,
)

from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import MODEL_NAME, World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

# rotated every DURATION - RENEW_BEFORE = 20 s; the previous token is revoked GRACE after its rotation
DURATION, RENEW_BEFORE, GRACE = 60, 40, 20
ROTATIONS = 3


class SecretReadingClient:
    """Sends chat completions through the Service, taking the key from the Secret: before every request
    (`refresh_s=0`) or every `refresh_s` seconds, like a kubelet refreshing a mounted Secret volume."""

    def __init__(self, world: World, base_url: str, refresh_s: float) -> None:
        self.world = world
        self.base_url = base_url
        self.refresh_s = refresh_s
        self.ok = 0
        self.tokens: set[str] = set()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"secret-client-{refresh_s}")

    def _run(self) -> None:
        token, read_at = None, 0.0
        while not self._stop.is_set():
            if token is None or time.monotonic() - read_at >= self.refresh_s:
                try:
                    token, read_at = secret_token(self.world, "rotating"), time.monotonic()
                except Exception as exc:  # the API server must stay readable too
                    self.failures.append(f"reading the Secret: {type(exc).__name__}: {exc}"[:300])
                    token = None
                if token is None:
                    self.failures.append("the Secret has no token")
                    self._stop.wait(0.5)
                    continue
            self.tokens.add(token)
            try:
                response = httpx.post(f"{self.base_url}/v1/chat/completions", timeout=30, trust_env=False,
                                      headers={"Authorization": f"Bearer {token}"},
                                      json={"model": MODEL_NAME, "max_tokens": 2, "temperature": 0.7,
                                            "messages": [{"role": "user", "content": "hello"}]})
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"token {token_id(token)}: HTTP {response.status_code} "
                                         f"{response.text[:200]}")
            except httpx.HTTPError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
            self._stop.wait(0.2)

    def __enter__(self) -> SecretReadingClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(40)


@dataclass
class Replaced:
    """A token replaced by a rotation, and what the test saw of it."""

    token: str
    rotated_at: float  # monotonic, when the test first saw the new token in the Secret
    revoke_at: datetime | None = None
    accepted_late_in_grace: bool = False
    refused_after: float | None = None  # seconds after revokeAt
    answers: list[str] = field(default_factory=list)


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_rotations_under_traffic_never_refuse_the_current_key(world: World, cluster) -> None:
    created = world.create(replicas=2)
    status = world.wait_phase("Completed", timeout=300)
    pods = server_pod_ips(world, color=status["activeColor"])
    assert len(pods) == 2, pods
    key = create_apikey(world, "rotating", duration=f"{DURATION}s", renewBefore=f"{RENEW_BEFORE}s",
                        gracePeriod=f"{GRACE}s")
    current = wait_for("the first token", lambda: secret_token(world, "rotating"), 60)
    replaced: list[Replaced] = []

    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            SecretReadingClient(world, proxy.url, refresh_s=0) as fresh, \
            SecretReadingClient(world, proxy.url, refresh_s=5) as lagging:
        deadline = time.monotonic() + ROTATIONS * (DURATION - RENEW_BEFORE) + 180
        while len(replaced) < ROTATIONS or any(r.refused_after is None for r in replaced):
            assert time.monotonic() < deadline, (
                f"{len(replaced)} rotation(s) seen; {[(token_id(r.token), r.answers[-3:]) for r in replaced]}")
            token = secret_token(world, "rotating")
            if token and token != current:
                if len(replaced) < ROTATIONS:  # later rotations go on, unwatched
                    replaced.append(Replaced(current, time.monotonic()))
                current = token
            for item in replaced:
                if item.refused_after is not None:
                    continue
                if item.revoke_at is None:
                    previous = {p["tokenId"]: p for p in get_apikey(world, "rotating")["status"].get(
                        "previousTokens") or []}
                    entry = previous.get(token_id(item.token))
                    if entry is None:
                        item.answers.append("not (yet) in status.previousTokens")
                        continue
                    item.revoke_at = parse_time(entry["revokeAt"])
                left = (item.revoke_at - datetime.now(item.revoke_at.tzinfo)).total_seconds()
                answers = {pod: call_models(ip, item.token) for pod, ip in pods.items()}
                item.answers.append(f"{left:.1f} s before revokeAt: "
                                    + ", ".join(f"{r.status_code}" for r in answers.values()))
                if left > 2:  # inside the grace period, with a margin for the clocks of this test and the servers
                    assert all(r.status_code == 200 for r in answers.values()), (
                        f"the previous token was refused {left:.1f} s before its grace period ends: "
                        f"{[r.text[:200] for r in answers.values()]}")
                    if left < GRACE / 2:
                        item.accepted_late_in_grace = True
                elif left < 0 and all(refused(r, "revoked") for r in answers.values()):
                    # 'revoked', not 'expired': refused at the end of its grace, long before its own expiry
                    item.refused_after = -left
            time.sleep(0.5)
        time.sleep(1)

    tokens = sorted({r.token for r in replaced} | {current} | fresh.tokens | lagging.tokens)
    for client_ in (fresh, lagging):
        assert client_.failures == [], f"{len(client_.failures)} failed request(s): {client_.failures[:5]}"
        assert client_.ok > 20
    assert len(fresh.tokens) >= ROTATIONS + 1, "the client did not send with each rotated token"
    for item in replaced:
        assert item.accepted_late_in_grace, f"{token_id(item.token)} never checked late in its grace: {item.answers}"
        assert item.refused_after is not None and item.refused_after < 60, item.answers
    print("\nrotation: previous tokens refused by every replica "
          + ", ".join(f"{r.refused_after:.1f} s" for r in replaced if r.refused_after is not None)
          + f" after their revokeAt; {fresh.ok + lagging.ok} requests answered, none refused")

    events = event_messages(world, ("Issued", "Rotated", "Revoked"))
    assert sum(1 for name in events if name.startswith("Rotated ApiKey/rotating")) >= ROTATIONS, sorted(events)
    assert sum(1 for name in events if name.startswith("Revoked ApiKey/rotating")) >= ROTATIONS, sorted(events)
    assert_no_token_in(events, tokens)
    assert_no_token_in(server_logs(cluster, world.namespace), tokens)
    manager = manager_of(key)
    assert_spec_untouched(get_apikey(world, "rotating"), manager, 1)
    assert_spec_untouched(world.get(), manager_of(created), 1)
