"""A request that does not set `temperature` or `top_p` is sampled with the model's own defaults from its
`generation_config.json`, as vLLM does (`--generation-config auto`); 1.0 where the model has none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
from deepseek_server.app import create_app
from deepseek_server.engine.sampling import model_sampling_defaults
from transformers import GenerationConfig

from devcluster.testing.model_server import ServerThread, tiny_settings

SEEDS = range(1, 9)


def test_the_defaults_are_the_fields_vllm_reads_that_differ_from_unset() -> None:
    assert model_sampling_defaults(GenerationConfig()) == ({}, {})
    assert model_sampling_defaults(None) == ({}, {})
    r1 = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, bos_token_id=0, eos_token_id=1)
    assert model_sampling_defaults(r1) == ({"temperature": 0.6, "top_p": 0.95}, {})
    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert model_sampling_defaults(qwen) == ({"temperature": 0.7, "top_p": 0.8},
                                             {"top_k": 20, "repetition_penalty": 1.05})


def completions(url: str, **sampling: float) -> list[str]:
    return [httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "deepseek-tiny", "prompt": "The weather today", "max_tokens": 12, "seed": seed, **sampling,
    }).json()["choices"][0]["text"] for seed in SEEDS]


def test_a_request_without_temperature_or_top_p_gets_the_models_own(tiny_models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    model = tmp_path / "tiny-r1-like"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0.6,
                                                              "top_p": 0.95}))
    server = ServerThread(create_app(tiny_settings(model, auth="disabled"))).start()
    try:
        unset = completions(server.url)
        assert unset == completions(server.url, temperature=0.6, top_p=0.95)
        # the same seeds at 1.0 draw other words (sampled from a random model's flat distribution): not what ran
        assert unset != completions(server.url, temperature=1.0, top_p=1.0)
        assert completions(server.url, temperature=1.0) != unset  # a value sent is the value used
    finally:
        server.stop()
