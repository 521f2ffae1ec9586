"""Scale-down under traffic: server pods being removed stop getting new requests, finish what they have (requests
and streams), then exit; no client sees an error. Real operator, real servers (tiny model), the devcluster Service
proxy in front, and three kinds of clients: a new connection per request, a reused keep-alive connection, streams."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx
import openai
import pytest

from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import MODEL_NAME, World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

STREAM_TOKENS = 120


class MixedTraffic:
    """Worker threads sending through `base_url` until stopped, counting successes per kind and every failure."""

    KINDS = ("new-connection", "keep-alive", "stream")

    def __init__(self, base_url: str, token: str, workers_per_kind: int = 2) -> None:
        self.base_url = base_url
        self.token = token
        self.ok: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True, name=f"traffic-{kind}-{i}")
                         for kind in self.KINDS for i in range(workers_per_kind)]

    def _client(self, http: httpx.Client) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.token, http_client=http, max_retries=0)

    def _once(self, kind: str, api: openai.OpenAI) -> None:
        messages = [{"role": "user", "content": "hello"}]
        if kind == "stream":
            chunks, finish = 0, None
            for chunk in api.chat.completions.create(model=MODEL_NAME, max_tokens=STREAM_TOKENS, temperature=0.9,
                                                     messages=messages, stream=True):
                chunks += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            if finish not in ("stop", "length"):
                raise AssertionError(f"stream ended after {chunks} chunk(s) without a finish_reason")
        else:
            reply = api.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=0.9, messages=messages)
            if not reply.choices:
                raise AssertionError("no choices")

    def _run(self, kind: str) -> None:
        shared = httpx.Client(timeout=60, trust_env=False) if kind == "keep-alive" else None
        try:
            while not self._stop.is_set():
                http = shared or httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=60,
                                              trust_env=False)
                try:
                    self._once(kind, self._client(http))
                    with self._lock:
                        self.ok[kind] += 1
                except Exception as exc:  # every failure counts, whatever its type
                    with self._lock:
                        self.failures.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
                finally:
                    if shared is None:
                        http.close()
                self._stop.wait(0.05)
        finally:
            if shared is not None:
                shared.close()

    def total(self) -> int:
        with self._lock:
            return sum(self.ok.values())

    def __enter__(self) -> MixedTraffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


def server_pods(world: World) -> list[Any]:
    return world.core.list_namespaced_pod(world.namespace, label_selector="deepseek.ai/deployment=chat").items


def test_scale_down_under_traffic_fails_no_request(world: World) -> None:
    world.create(replicas=3, server={"precision": "fp32", "maxNewTokens": STREAM_TOKENS, "maxBatchSize": 8,
                                     "shutdownGraceSeconds": 20})
    world.wait_phase("Completed", timeout=300)
    wait_for("3 ready replicas", lambda: world.status().get("readyReplicas") == 3, 120)
    template = world.apps.read_namespaced_deployment("chat-blue", world.namespace).spec.template.spec
    server = template.containers[0]
    assert server.args[server.args.index("--shutdown-grace-s") + 1] == "20"
    assert template.termination_grace_period_seconds >= 20 + 5  # the preStop wait, the drain, then the grace

    token = world.create_apikey()
    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy, \
            MixedTraffic(proxy.url + "/v1", token) as traffic:
        wait_for("traffic of every kind", lambda: all(traffic.ok[kind] >= 3 for kind in MixedTraffic.KINDS), 120)
        world.patch({"spec": {"replicas": 1}})
        wait_for("two pods removed", lambda: len(server_pods(world)) == 1, 180)
        removed_at = traffic.total()
        wait_for("traffic on the remaining pod", lambda: traffic.total() >= removed_at + 10, 60)
    assert traffic.failures == [], f"{len(traffic.failures)} failed request(s): {traffic.failures[:5]}"
    assert all(traffic.ok[kind] > 0 for kind in MixedTraffic.KINDS), traffic.ok
    assert world.status()["readyReplicas"] == 1
