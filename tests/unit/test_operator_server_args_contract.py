"""The command lines the operator writes into its pods, read by the server's own CLI parser and settings.

The two distributions never import each other; this test imports both to hold the contract between them.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from deepseek_operator.engines import VLLM_URL
from deepseek_operator.workloads import server_args

server_cli = pytest.importorskip("deepseek_server.__main__")
server_settings = pytest.importorskip("deepseek_server.settings")


def parsed(args: list[str]) -> Any:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    server_cli._serve_parser(sub)
    options = {k: v for k, v in vars(parser.parse_args(args)).items() if k != "command"}
    return server_settings.ServerSettings(**options)


def dsd(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"name": "deepseek-ai/deepseek-llm-7b-chat"}, "image": "srv:1",
                            "resources": {"gpus": 2},
                            "server": {"precision": "fp16", "maxBatchSize": 16, "maxModelLen": 4096,
                                       "maxNewTokens": 256, "cache": {"enabled": False}},
                            "redis": {"url": "redis://r:6379/0"}}
    return {"metadata": {"name": "chat", "namespace": "team"}, "spec": {**base, **spec}}


def test_builtin_server_args_parse_into_the_settings_they_mean() -> None:
    settings = parsed(server_args(dsd()))
    assert settings.engine == "builtin"
    assert (settings.model, settings.model_name, settings.precision) == ("/models/model",
                                                                         "deepseek-ai/deepseek-llm-7b-chat", "fp16")
    assert (settings.host, settings.port, settings.max_new_tokens) == ("", 8000, 256)


def test_vllm_gateway_args_parse_into_a_gateway_for_the_engine_on_loopback() -> None:
    settings = parsed(server_args(dsd(engine={"name": "vllm"})))
    assert (settings.engine, settings.engine_url) == ("vllm", VLLM_URL)
    assert settings.model is None and settings.model_name == "deepseek-ai/deepseek-llm-7b-chat"
    assert (settings.host, settings.port, settings.max_new_tokens) == ("", 8000, 256)
    assert settings.redis_url == "redis://r:6379/0" and not settings.cache_enabled
    assert settings.auth_configmap == "team/chat-auth"


@pytest.mark.parametrize("engine", [{}, {"engine": {"name": "vllm"}}])
def test_cache_identity_args_parse_into_the_settings_that_key_the_cache(engine: dict[str, Any]) -> None:
    settings = parsed(server_args(dsd(**engine), "3f2a9c01de"))
    assert (settings.deployment, settings.model_revision) == ("team/chat", "3f2a9c01de")
    assert settings.record_key is None  # it comes from the environment (a Secret), never from the command line


def test_shutdown_grace_parses_into_the_servers_graceful_shutdown_time() -> None:
    assert parsed(server_args(dsd(server={"precision": "bf16", "shutdownGraceSeconds": 90}))).shutdown_grace_s == 90
    assert parsed(server_args(dsd(server={"precision": "bf16", "shutdownGraceSeconds": 0}))).shutdown_grace_s == 0


def test_the_replicas_cpu_request_parses_into_torch_threads() -> None:
    assert parsed(server_args(dsd(resources={"gpus": 0, "cpu": "1500m"}))).torch_threads == 2
    assert parsed(server_args(dsd())).torch_threads is None  # no request: the server counts its own CPUs
