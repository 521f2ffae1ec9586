"""Seeded random combinations of the OpenAI parameters the built-in engine takes, on each tiny architecture, four
requests at a time (so they share batches): every answer is a 200 that keeps OpenAI's contract or a 400 in OpenAI's
error shape, never a 5xx (devcluster.testing.openai_requests). One parameter alone is tested where it is documented
(test_server_openai_parameters); this covers how they meet, in one batch, on each architecture's tokenizer."""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from deepseek_server.app import create_app

from devcluster.testing.model_server import ServerThread, tiny_settings
from devcluster.testing.openai_requests import check, random_request

REQUESTS = 160


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_random_parameter_combinations_keep_the_openai_contract(
        arch: str, tiny_models: dict[str, Path], auth_dir: Path, token_factory: Callable[..., str],
        tmp_path: Path) -> None:
    rng = random.Random(f"combinations-{arch}")
    requests = [random_request(rng, "deepseek-tiny") for _ in range(REQUESTS)]
    settings = tiny_settings(tiny_models[arch], auth_dir=auth_dir, audit_log=tmp_path / "audit.jsonl")
    server = ServerThread(create_app(settings)).start()
    try:
        with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {token_factory()}"},
                          timeout=120) as client, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda request: client.post(request[0], json=request[1]), requests))
    finally:
        server.stop()
    for (path, body), response in zip(requests, answers, strict=True):
        check(path, body, response)
    statuses = [response.status_code for response in answers]
    assert statuses.count(200) > REQUESTS // 3, statuses  # most combinations are answered, not refused
