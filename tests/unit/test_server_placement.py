"""Where the built-in engine puts a model's weights, and in which form, for a given spec and machine."""

from __future__ import annotations

import pytest
import torch
from deepseek_server.engine.placement import (
    MIN_HEADROOM_BYTES,
    PlacementError,
    estimate_model_bytes,
    plan_placement,
)

GIB = 2**30
H100 = 80 * GIB


def test_cpu_keeps_the_precision_and_loads_without_a_device_map() -> None:
    placement = plan_placement("bf16", "cpu", gpu_count=0)
    assert (placement.device_map, placement.max_memory, placement.quantization) == (None, None, "none")
    assert placement.dtype == torch.bfloat16 and placement.input_device == torch.device("cpu")
    assert placement.from_pretrained_kwargs() == {"dtype": torch.bfloat16}


def test_auto_without_gpus_is_the_cpu() -> None:
    assert plan_placement("fp32", "auto", gpu_count=0).input_device == torch.device("cpu")


def test_int8_on_cpu_is_dynamic_quantization_of_fp32_weights() -> None:
    placement = plan_placement("int8", "cpu", gpu_count=0)
    assert placement.quantization == "dynamic-int8" and placement.dtype == torch.float32
    assert "quantization_config" not in placement.from_pretrained_kwargs()


def test_one_gpu_holds_the_whole_model() -> None:
    placement = plan_placement("bf16", "auto", gpu_count=1, gpu_memory_bytes=[H100])
    assert placement.device_map == {"": 0} and placement.max_memory is None
    assert placement.input_device == torch.device("cuda", 0) and placement.gpus == (0,)
    assert placement.from_pretrained_kwargs() == {"dtype": torch.bfloat16, "device_map": {"": 0}}


def test_two_gpus_shard_with_a_per_gpu_cap_that_leaves_headroom() -> None:
    placement = plan_placement("bf16", "cuda", gpu_count=2, gpu_memory_bytes=[40 * GIB, 40 * GIB])
    assert placement.device_map == "auto"
    assert placement.max_memory == {0: 32 * GIB, 1: 32 * GIB}  # 20 % of each kept for the KV cache
    assert "cpu" not in placement.max_memory and "disk" not in placement.max_memory  # never offloaded
    assert placement.input_device == torch.device("cuda", 0)
    kwargs = placement.from_pretrained_kwargs()
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"] == placement.max_memory


def test_eight_gpus_all_take_part() -> None:
    placement = plan_placement("fp16", "auto", gpu_count=8, gpu_memory_bytes=[H100] * 8)
    assert placement.gpus == tuple(range(8)) and placement.dtype == torch.float16
    assert placement.max_memory == dict.fromkeys(range(8), 64 * GIB)


def test_small_gpus_keep_at_least_the_minimum_headroom() -> None:
    placement = plan_placement("fp16", "cuda", gpu_count=2, gpu_memory_bytes=[5 * GIB, 5 * GIB])
    assert placement.max_memory == {0: 5 * GIB - MIN_HEADROOM_BYTES, 1: 5 * GIB - MIN_HEADROOM_BYTES}


def test_a_pinned_gpu_is_used_alone() -> None:
    placement = plan_placement("bf16", "cuda:1", gpu_count=2, gpu_memory_bytes=[H100, H100])
    assert placement.device_map == {"": 1} and placement.input_device == torch.device("cuda", 1)
    with pytest.raises(PlacementError, match=r"cuda:2 .* only 2 GPU"):
        plan_placement("bf16", "cuda:2", gpu_count=2)


def test_int8_on_gpu_loads_8_bit_weights_through_bitsandbytes() -> None:
    placement = plan_placement("int8", "cuda", gpu_count=2, gpu_memory_bytes=[H100, H100],
                               bitsandbytes_available=True)
    assert placement.quantization == "bitsandbytes-int8" and placement.dtype == torch.bfloat16
    config = placement.from_pretrained_kwargs()["quantization_config"]
    assert config.load_in_8bit is True and config.load_in_4bit is False
    older = plan_placement("int8", "cuda", gpu_count=1, bitsandbytes_available=True, bf16_supported=False)
    assert older.dtype == torch.float16  # e.g. a T4: no bf16


def test_int8_on_gpu_without_bitsandbytes_names_the_package() -> None:
    with pytest.raises(PlacementError, match=r"bitsandbytes, which is not installed.*bf16/fp16"):
        plan_placement("int8", "cuda", gpu_count=1, bitsandbytes_available=False)


def test_gpus_without_accelerate_name_the_package() -> None:
    with pytest.raises(PlacementError, match="accelerate, which is not installed"):
        plan_placement("bf16", "auto", gpu_count=1, accelerate_available=False)


def test_cuda_without_a_visible_gpu_says_so() -> None:
    with pytest.raises(PlacementError, match="no GPU is visible"):
        plan_placement("bf16", "cuda", gpu_count=0)


def test_a_model_larger_than_the_gpus_is_refused_before_loading() -> None:
    model = estimate_model_bytes(66 * GIB, "bfloat16", "bf16")  # a 33B model in bf16
    with pytest.raises(PlacementError, match=r"needs about 66.0 GiB .* 2 GPU\(s\) hold 51.2 GiB"):
        plan_placement("bf16", "cuda", gpu_count=2, gpu_memory_bytes=[32 * GIB] * 2, model_bytes=model)
    fits = plan_placement("bf16", "cuda", gpu_count=2, gpu_memory_bytes=[H100] * 2, model_bytes=model)
    assert fits.device_map == "auto"
    in_int8 = estimate_model_bytes(66 * GIB, "bfloat16", "int8")
    assert plan_placement("int8", "cuda", gpu_count=2, gpu_memory_bytes=[32 * GIB] * 2, model_bytes=in_int8,
                          bitsandbytes_available=True).quantization == "bitsandbytes-int8"


def test_model_size_scales_from_the_stored_dtype() -> None:
    assert estimate_model_bytes(400, "float32", "bf16") == 200
    assert estimate_model_bytes(200, "bfloat16", "fp32") == 400
    assert estimate_model_bytes(200, None, "int8") == 100


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu:0"])
def test_unknown_devices_are_refused(device: str) -> None:
    with pytest.raises(PlacementError, match="not valid"):
        plan_placement("bf16", device, gpu_count=1)
