"""devcluster runs the real vllm/vllm-openai image's job with vLLM's CPU build: pod args as a real cluster passes them,
readiness on vLLM's own /health, OpenAI completions answered at the pod IP.

Needs the vLLM virtualenv (`make vllm-env`); without it these tests fail saying so, they never skip.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devcluster import cli_pods, vllm_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

IMAGE = "vllm/vllm-openai:v0.32.0"
MODEL_MOUNT = "/run/devcluster-tests/vllm-model"
PORT = 8000


@pytest.fixture(scope="module")
def vllm_installed() -> None:
    if not vllm_env.is_ready():
        pytest.fail(f"vLLM's CPU build is not installed in {vllm_env.venv_dir()}: run `make vllm-env` "
                    "(a Python 3.12 virtualenv, ~6 GB, once)")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepseek_server.tiny_model import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("vllm") / "tiny-llama")


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, client.ApiException, http.client.HTTPException) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def post_json(ip: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{ip}:{PORT}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def vllm_pod(model_dir: Path) -> dict[str, Any]:
    """A pod as the operator's `vllm` engine would write it: the image's entry point, GPUs, probes on /health."""
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "vllm", "labels": {"app": "vllm"}},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "vllm", "image": IMAGE,
                # what the operator writes for a 2-GPU fp8 spec (on the pod IP here, so the test reaches it)
                "args": [MODEL_MOUNT, "--host", "0.0.0.0", "--port", str(PORT), "--served-model-name", "tiny",
                         "--tensor-parallel-size", "2", "--dtype", "bfloat16", "--quantization", "fp8",
                         "--gpu-memory-utilization", "0.9", "--max-model-len", "256", "--enable-prefix-caching",
                         # no torch.compile: the same server, started in about a third of the time
                         "--enforce-eager", "-O0"],
                "ports": [{"name": "http", "containerPort": PORT}],
                "resources": {"limits": {"nvidia.com/gpu": "2"}},
                "startupProbe": {**probe, "failureThreshold": 600},
                "readinessProbe": probe,
                "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}],
            }],
            "volumes": [{"name": "model", "hostPath": {"path": str(model_dir), "type": "Directory"}}],
        },
    }


def pod_logs(cluster, namespace: str, pod: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    args = argparse.Namespace(pod=pod, namespace=namespace, container=None, follow=False, previous=False)
    cli_pods.cmd_logs(args, cluster)
    return capsys.readouterr().out


def test_vllm_image_serves_a_tiny_model_at_its_pod_ip(vllm_installed, tiny_llama: Path, cluster, api_client,
                                                      namespace, capsys: pytest.CaptureFixture[str]) -> None:
    if not cluster.state.network:
        pytest.fail("devcluster has no pod network (it needs root), so process pods cannot run: run as root")
    core = client.CoreV1Api(api_client)
    wait_for("the default ServiceAccount", lambda: core.read_namespaced_service_account("default", namespace), 30)
    started = time.monotonic()
    core.create_namespaced_pod(namespace, vllm_pod(tiny_llama))

    def ready_ip() -> str | None:
        pod = core.read_namespaced_pod("vllm", namespace)
        statuses = pod.status.container_statuses or []
        if statuses and statuses[0].restart_count:
            raise AssertionError(f"vLLM's container restarted: {statuses[0].last_state}")
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        return pod.status.pod_ip if ready else None

    try:
        ip = wait_for("the vLLM pod Ready (readiness on vLLM's /health)", ready_ip, timeout=420)
    except AssertionError as exc:
        log_tail = pod_logs(cluster, namespace, "vllm", capsys)[-4000:]
        raise AssertionError(f"{exc}\n--- vLLM's log:\n{log_tail}") from None
    ready_after = time.monotonic() - started
    logs = pod_logs(cluster, namespace, "vllm", capsys)
    print(f"\nvLLM pod created -> Ready: {ready_after:.1f}s")
    # what the CPU process cannot honour is said in the container's log, not silently changed
    assert "--tensor-parallel-size 2 -> 1: devcluster's GPUs are simulated" in logs
    assert "dropped --quantization fp8" in logs

    with urllib.request.urlopen(f"http://{ip}:{PORT}/v1/models", timeout=10) as resp:
        models = json.loads(resp.read())
    assert [m["id"] for m in models["data"]] == ["tiny"]

    completion = post_json(ip, "/v1/completions", {"model": "tiny", "prompt": "Hello, world", "max_tokens": 8,
                                                   "temperature": 0, "ignore_eos": True})
    assert completion["object"] == "text_completion"
    assert isinstance(completion["choices"][0]["text"], str)
    assert completion["usage"]["completion_tokens"] == 8 and completion["usage"]["prompt_tokens"] > 0

    chat = post_json(ip, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 5 and chat["usage"]["prompt_tokens"] > 0


def test_without_the_vllm_virtualenv_the_container_fails_saying_what_to_run(cluster, api_client, namespace,
                                                                            capsys: pytest.CaptureFixture[str],
                                                                            tmp_path: Path) -> None:
    if not cluster.state.network:
        pytest.fail("devcluster has no pod network (it needs root), so process pods cannot run: run as root")
    core = client.CoreV1Api(api_client)
    wait_for("the default ServiceAccount", lambda: core.read_namespaced_service_account("default", namespace), 30)
    missing = tmp_path / "no-venv"
    entry = Path(vllm_env.__file__).with_name("vllm_entry.py")
    pod = vllm_pod(tmp_path)
    pod["metadata"]["name"] = "novllm"
    pod["spec"]["containers"][0]["command"] = [sys.executable, str(entry), "--vllm-venv", str(missing), "--"]
    # Never restarted, so the log read below is the run that failed, not an empty log of the next run (with
    # restartPolicy Always a restart can begin between seeing the exit and reading the log)
    pod["spec"]["restartPolicy"] = "Never"
    core.create_namespaced_pod(namespace, pod)

    def terminated() -> Any:
        status = (core.read_namespaced_pod("novllm", namespace).status.container_statuses or [None])[0]
        return status and status.state.terminated

    assert wait_for("the container to exit", terminated, timeout=60).exit_code == 1
    assert f"vLLM is not installed: no {missing}/bin/python. Run `make vllm-env`" in pod_logs(
        cluster, namespace, "novllm", capsys)
