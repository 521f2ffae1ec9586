"""The vllm engine end to end: the operator, a real vLLM (devcluster runs the `vllm/vllm-openai` image as vLLM's CPU
build) behind the deepseek-server gateway in the same pod, and OpenAI clients through the active Service.

vLLM takes about a minute to start a pod here, so one deployment goes through every step: builtin first, then a
blue-green rollout to vllm under continuous traffic, then the gateway's answers, then a killed engine.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client

from devcluster import vllm_env
from devcluster.podnet import netns_pids
from devcluster.proxy import ServiceProxy
from devcluster.testing.bluegreen import GROUP, MODEL_NAME, VERSION, ContinuousClient, World, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500)]

VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"


@pytest.fixture
def vllm_world(world: World) -> World:
    """The blue-green world (operator, tiny model), on a machine where vLLM's CPU build is installed."""
    if not vllm_env.is_ready():
        pytest.fail(f"vLLM's CPU build is not installed in {vllm_env.venv_dir()}: run `make vllm-env` "
                    "(`make test` does)")
    return world


def create_key(world: World, name: str, **spec: Any) -> str:
    """An ApiKey for `chat` with the given spec fields; returns its token once the Secret holds it."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": name},
            "spec": {"deploymentRef": {"name": "chat"}, "subject": name, "environment": "dev", **spec}}
    world.custom.create_namespaced_custom_object(GROUP, VERSION, world.namespace, "apikeys", body)

    def token() -> str | None:
        try:
            data = world.core.read_namespaced_secret(f"{name}-apikey", world.namespace).data or {}
        except client.ApiException:
            return None
        return base64.b64decode(data["api-key"]).decode() if "api-key" in data else None
    return str(wait_for(f"ApiKey {name}'s Secret", token, 60))


def chat(api: openai.OpenAI, **extra: Any) -> Any:
    return api.chat.completions.create(**{"model": MODEL_NAME, "max_tokens": 8, "temperature": 0.7,
                                          "messages": [{"role": "user", "content": "Say hello"}], **extra})


def rate_limited(api: openai.OpenAI) -> openai.RateLimitError:
    """The 429 a key with a burst of 1 gets, once the gateway has its limits (they follow the key's Secret)."""
    for _ in range(20):
        try:
            chat(api)
        except openai.RateLimitError as exc:
            return exc
        time.sleep(0.5)
    raise AssertionError("20 requests of a key limited to a burst of 1 were all admitted")


def pod_ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def engine_process(pod: client.V1Pod) -> int:
    """The pid of the `engine` container's main process: vLLM's API server in the pod's network namespace (the
    container's session leader; its engine-core workers share its process group)."""
    suffix = pod.metadata.uid.replace("-", "")[:12]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    netns = next(name for name in names if name.startswith("dcpod-") and name.endswith(suffix))
    for pid in netns_pids(netns):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            leader = os.getsid(pid) == pid
        except (FileNotFoundError, ProcessLookupError):
            continue
        if leader and any(b"vllm.entrypoints" in part for part in cmdline):
            return pid
    raise AssertionError(f"no vLLM process in {netns} (pod {pod.metadata.name})")


def test_builtin_to_vllm_rollout_gateway_answers_and_a_killed_engine(vllm_world: World) -> None:
    world = vllm_world
    # vLLM's first start here takes minutes on a busy machine; the deadline (and the engine's startup probe) allow it
    world.create(rollout={"progressDeadlineSeconds": 900, "scaleDownDelaySeconds": 600,
                          "analysis": {"requests": 2, "windowSeconds": 3, "maxLatencyMs": 20000}})
    first = world.wait_phase("Completed", timeout=240)["activeRevision"]
    token = world.create_apikey()
    reader = create_key(world, "reader", scopes=["history:read"])
    limited = create_key(world, "limited", scopes=["model:predict"],
                         rateLimit={"requestsPerSecond": 0.01, "burst": 1})

    with ServiceProxy(world.api_client, world.namespace, "chat") as proxy:
        base_url = proxy.url + "/v1"
        api = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60)
        assert chat(api).choices

        # 1. builtin -> vllm is a blue-green rollout; traffic never fails while it happens
        with ContinuousClient(base_url, token) as traffic:
            # --enforce-eager -O0: vLLM without torch.compile starts in about a third of the time here
            world.patch({"spec": {"engine": {"name": "vllm", "image": VLLM_IMAGE,
                                             "extraArgs": ["--enforce-eager", "-O0"]}}})
            second = wait_for("the vllm revision", lambda: (world.status().get("rollout") or {}).get("revision")
                              not in (None, first) and world.status()["rollout"]["revision"], 30)
            status = world.wait_phase("Completed", revision=second, timeout=900)
            assert status["activeColor"] == "green" and status["activeRevision"] == second
            latest = status["history"][0]
            assert (latest["revision"], latest["engine"], latest["engineImage"]) == (second, "vllm", VLLM_IMAGE)
        assert traffic.ok > 10
        assert traffic.failures == [], f"{len(traffic.failures)} failed requests: {traffic.failures[:5]}"

        pods = world.core.list_namespaced_pod(world.namespace,
                                              label_selector=f"deepseek.ai/revision={second}").items
        assert len(pods) == 1
        pod = pods[0]
        containers = {c.name: c for c in pod.spec.containers}
        assert list(containers) == ["server", "engine"]
        assert containers["engine"].image == VLLM_IMAGE
        assert containers["engine"].args[-2:] == ["--enforce-eager", "-O0"]  # engine.extraArgs, after the derived ones
        assert containers["engine"].resources.limits["nvidia.com/gpu"] == "1"
        assert not (containers["server"].resources.limits or {})
        assert containers["server"].args[:5] == ["serve", "--engine", "vllm", "--engine-url", "http://127.0.0.1:8001"]
        ip = pod.status.pod_ip
        with pytest.raises(httpx.ConnectError):  # vLLM listens on the pod's loopback only
            httpx.get(f"http://{ip}:8001/health", timeout=5, trust_env=False)

        # 2. the official client through the Service: a chat, a stream, and what the gateway refuses
        reply = chat(api)
        assert reply.model == MODEL_NAME and reply.choices[0].message.content
        assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
        # without max_tokens, vLLM stops at spec.server.maxNewTokens (16 here), as the builtin engine does
        open_ended = api.chat.completions.create(model=MODEL_NAME, temperature=0.7,
                                                 messages=[{"role": "user", "content": "Tell a long story"}])
        assert open_ended.usage is not None and 1 <= open_ended.usage.completion_tokens <= 16
        # greedy, so the stream must say exactly what the same request answers in one piece (a random tiny model's
        # sampled tokens may all decode to nothing)
        whole = chat(api, temperature=0, user="whole").choices[0].message.content
        chunks = list(chat(api, stream=True, temperature=0, user="streamed"))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) >= 2 and streamed == whole
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
            ["length"], ["stop"])
        with pytest.raises(openai.AuthenticationError) as unauthenticated:
            chat(openai.OpenAI(base_url=base_url, api_key="not-a-key", max_retries=0, timeout=60))
        assert unauthenticated.value.code == "invalid_api_key"
        with pytest.raises(openai.PermissionDeniedError) as forbidden:
            chat(openai.OpenAI(base_url=base_url, api_key=reader, max_retries=0, timeout=60))
        assert forbidden.value.code == "insufficient_scope"
        limited_out = rate_limited(openai.OpenAI(base_url=base_url, api_key=limited, max_retries=0, timeout=60))
        assert int(limited_out.response.headers["retry-after"]) >= 1
        metrics = httpx.get(f"http://{ip}:8000/metrics", timeout=10, trust_env=False).text
        for status_code in ("401", "403", "429"):
            assert f'status="{status_code}"' in metrics, f"the gateway did not count a {status_code}"
        engine_metrics = httpx.get(f"http://{ip}:8000/metrics/engine", timeout=10, trust_env=False)
        assert engine_metrics.status_code == 200 and "vllm:" in engine_metrics.text

        # 3. a killed engine: the pod turns unready, the gateway answers 503, the kubelet restarts vLLM
        os.killpg(engine_process(pod), signal.SIGKILL)
        wait_for("the pod to turn unready", lambda: not pod_ready(
            world.core.read_namespaced_pod(pod.metadata.name, world.namespace)), 30)
        direct = httpx.post(f"http://{ip}:8000/v1/chat/completions", timeout=30, trust_env=False,
                            headers={"Authorization": f"Bearer {token}"},
                            json={"model": MODEL_NAME, "max_tokens": 4,
                                  "messages": [{"role": "user", "content": "hello"}]})
        assert direct.status_code == 503, direct.text
        assert set(direct.json()["error"]) >= {"message", "type", "code"}
        assert httpx.get(f"http://{ip}:8000/ready", timeout=10, trust_env=False).status_code == 503
        wait_for("the deployment to report no ready replica", lambda: world.condition("Ready").get("reason")
                 == "NoReadyReplicas", 30)

        restarted = wait_for("vLLM restarted and the pod ready again", lambda: (
            p := world.core.read_namespaced_pod(pod.metadata.name, world.namespace)) and pod_ready(p) and p, 600)
        engine_status = next(s for s in restarted.status.container_statuses if s.name == "engine")
        assert engine_status.restart_count >= 1
        server_status = next(s for s in restarted.status.container_statuses if s.name == "server")
        assert server_status.restart_count == 0, "the gateway must outlive its engine"
        assert chat(api).choices
