"""The engine's decoding (in-place KV cache, packed CPU weights) computes what transformers' own `generate` does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from deepseek_server.engine.base import GenerationRequest
from deepseek_server.engine.batched import BatchedEngine
from deepseek_server.engine.kv_cache import GrowingLayer
from deepseek_server.engine.loading import load_model


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
async def test_long_greedy_generations_match_generate(arch: str, tiny_models: dict[str, Path]) -> None:
    loaded = load_model(tiny_models[arch], "fp32", "cpu")
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=4, max_new_tokens=300)
    prompts = [engine.encode_text("The quick brown fox"), engine.encode_text("def add(a, b):")]
    expected = []
    with torch.inference_mode():
        for prompt in prompts:  # 150 tokens: the cache outgrows its first allocation more than once
            ids = torch.tensor([prompt])
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=150,
                                        do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
            expected.append(loaded.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True))
    await engine.start()
    try:
        results = await asyncio.gather(*(engine.submit(GenerationRequest(p, 150, temperature=0.0)).collect()
                                         for p in prompts))
    finally:
        await engine.stop()
    assert engine.joinable is True
    assert [text for text, _ in results] == expected


async def test_decode_steps_use_the_growing_cache(tiny_models: dict[str, Path]) -> None:
    loaded = load_model(tiny_models["llama"], "fp32", "cpu")
    engine = BatchedEngine(loaded, model_name="m", max_batch_size=2)
    seen: list[type] = []
    forward = engine._forward

    def spy(ids, mask, positions, cache):  # type: ignore[no-untyped-def]
        if ids.shape[1] == 1:  # a decode step
            seen.extend(type(layer) for layer in cache.layers)
        return forward(ids, mask, positions, cache)

    engine._forward = spy  # type: ignore[method-assign]
    await engine.start()
    try:
        await engine.submit(GenerationRequest(engine.encode_text("hello"), 5, temperature=0.0)).collect()
    finally:
        await engine.stop()
    assert seen and set(seen) == {GrowingLayer}
