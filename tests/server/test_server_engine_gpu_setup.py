"""What the built-in engine sets up for a GPU, checked on the CPU: the process-wide switches it turns and the log
noise it keeps out. What they buy is measured on a GPU by `bench/gpu_check.py` (see the README's benchmark table)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deepseek_server.engine.batched import BatchedEngine
from deepseek_server.engine.loading import LoadedModel, load_model, prepare_for_decoding
from deepseek_server.engine.placement import plan_placement


@pytest.fixture
def cudnn_attention_restored() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(tiny_models["llama"], "fp32", "cpu")


def test_an_engine_on_a_gpu_keeps_attention_off_cudnn(loaded: LoadedModel, cudnn_attention_restored: None) -> None:
    # cuDNN's attention prepares a plan for every new mask length, i.e. every decode step: 4.6 and 2.8 times fewer
    # tokens/s at 16 and 64 rows on an H200. The engine never moves anything in its constructor, so a CPU model
    # stands in for one on the GPU.
    BatchedEngine(loaded, model_name="cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled(), "an engine on the CPU changed the GPU's attention backends"
    BatchedEngine(dataclasses.replace(loaded, device=torch.device("cuda", 0)), model_name="gpu")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_8_bit_weights_on_a_gpu_drop_bitsandbytes_cast_notice_only(loaded: LoadedModel,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    # bitsandbytes logs this from every 8-bit matmul of bf16 inputs: 14,448 lines from 16 requests on an H200
    placement = plan_placement("int8", "cuda", gpu_count=1, gpu_memory_bytes=[80 * 2**30],
                               bitsandbytes_available=True)
    assert placement.quantization == "bitsandbytes-int8"
    prepare_for_decoding(loaded.model, placement)
    prepare_for_decoding(loaded.model, placement)
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    assert len(bnb.filters) == 1, "loading twice stacked the filter"
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        bnb.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        bnb.warning("some other notice from bitsandbytes")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == [
        "some other notice from bitsandbytes"]
