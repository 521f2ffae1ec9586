"""Where a model's weights go and in which form: one decision, made from the spec and what the machine has.

Pure: the caller passes what it observed (GPUs visible, their memory, installed packages, the checkpoint's size) and
gets back data, `Placement`, that `loading` hands to transformers. The rules:

- CPU: the whole model on the CPU; `int8` is dynamic quantization of Linear layers (weights fp32 on load).
- One GPU: the whole model on it (`device_map={"": index}`), loaded straight onto the GPU without a CPU copy.
- N GPUs (`device="cuda"` or `"auto"`, N = the GPUs the pod sees): layers are spread evenly over all of them
  (`device_map="auto"`, balanced), each GPU capped at its memory minus a headroom for the KV cache and activations
  (`max_memory`); never offloaded to CPU or disk. Inputs go to the first shard, where the embeddings live.
- `int8` on GPU: 8-bit weights through bitsandbytes (`BitsAndBytesConfig(load_in_8bit=True)`); the layers it leaves
  alone run in bf16, or fp16 on GPUs without bf16.
- `device="cuda:N"` pins the model to that one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Precision = Literal["bf16", "fp16", "fp32", "int8"]
Quantization = Literal["none", "dynamic-int8", "bitsandbytes-int8"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BYTES_PER_PARAMETER = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_HEADROOM = 0.2  # of each GPU's memory, kept free of weights for the KV cache and activations
MIN_HEADROOM_BYTES = 2 << 30  # at least this much per GPU (CUDA context, allocator slack, a first batch)


class PlacementError(ValueError):
    """The spec cannot be placed on this machine; the message says what to change."""


@dataclass(frozen=True)
class Placement:
    """How to load the model: transformers' `device_map`/`max_memory`, dtype and quantization, and the input device."""

    device_map: dict[str, int | str] | str | None
    max_memory: dict[int | str, int] | None
    dtype: torch.dtype
    quantization: Quantization
    input_device: torch.device
    gpus: tuple[int, ...] = field(default=())

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `AutoModelForCausalLM.from_pretrained`."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        if self.quantization == "bitsandbytes-int8":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        return kwargs

    def describe(self) -> str:
        where = "cpu" if not self.gpus else f"{len(self.gpus)} GPU(s) {list(self.gpus)}"
        return f"{where}, {str(self.dtype).removeprefix('torch.')}, quantization {self.quantization}"


def plan_placement(
    precision: Precision,
    device: str,
    *,
    gpu_count: int,
    gpu_memory_bytes: list[int] | None = None,
    bf16_supported: bool = True,
    accelerate_available: bool = True,
    bitsandbytes_available: bool = False,
    model_bytes: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
) -> Placement:
    """Decide the placement for `precision` on `device` ("auto", "cpu", "cuda" or "cuda:N").

    `gpu_count` and `gpu_memory_bytes` (total memory of each visible GPU) describe the machine; `model_bytes`, when
    known, is the weights' size at this precision, to refuse early what cannot fit.
    """
    if precision not in ("bf16", "fp16", "fp32", "int8"):
        raise PlacementError(f"unknown precision {precision!r}; use bf16, fp16, fp32 or int8")
    target = _target(device, gpu_count)
    if target is None:
        if precision == "int8":  # dynamic quantization works on fp32 weights
            return Placement(None, None, torch.float32, "dynamic-int8", torch.device("cpu"))
        return Placement(None, None, DTYPES[precision], "none", torch.device("cpu"))

    if not accelerate_available:
        raise PlacementError("loading a model onto GPUs needs the Python package accelerate, which is not installed; "
                             "install deepseek-server[builtin] (or `pip install accelerate`)")
    quantization: Quantization = "none"
    if precision == "int8":
        if not bitsandbytes_available:
            raise PlacementError("precision int8 on a GPU loads 8-bit weights through the Python package "
                                 "bitsandbytes, which is not installed; install deepseek-server[builtin] (or "
                                 "`pip install bitsandbytes`), or use precision bf16/fp16")
        quantization = "bitsandbytes-int8"
        dtype = torch.bfloat16 if bf16_supported else torch.float16
    else:
        dtype = DTYPES[precision]

    gpus = target
    memory = gpu_memory_bytes or []
    if len(memory) < gpu_count:
        memory = []  # unknown: let accelerate measure
    budgets = {i: _budget(memory[i], headroom) for i in gpus} if memory else None
    if model_bytes is not None and budgets is not None and model_bytes > sum(budgets.values()):
        available = sum(budgets.values())
        raise PlacementError(
            f"the model needs about {_gib(model_bytes)} of GPU memory at precision {precision}, but "
            f"{len(gpus)} GPU(s) hold {_gib(available)} after keeping {headroom:.0%} (at least "
            f"{_gib(MIN_HEADROOM_BYTES)}) of each free for the KV cache; give the replica more GPUs "
            "(resources.gpus) or use precision int8")
    if len(gpus) == 1:
        return Placement({"": gpus[0]}, None, dtype, quantization, torch.device("cuda", gpus[0]), tuple(gpus))
    return Placement("auto", budgets, dtype, quantization, torch.device("cuda", gpus[0]), tuple(gpus))


def estimate_model_bytes(checkpoint_bytes: int, stored_dtype: str | None, precision: Precision) -> int:
    """Weights' size in memory at `precision`, from their size on disk and the dtype they were saved in."""
    stored = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(stored_dtype).removeprefix("torch."), 2)
    target = 1 if precision == "int8" else BYTES_PER_PARAMETER[precision]
    return checkpoint_bytes * target // stored


def _target(device: str, gpu_count: int) -> list[int] | None:
    """The GPU indexes to use, or None for the CPU."""
    if device == "cpu":
        return None
    if device == "auto":
        return list(range(gpu_count)) or None
    if device == "cuda":
        if gpu_count == 0:
            raise PlacementError("device cuda was asked for but no GPU is visible to this process "
                                 "(check the pod's GPU request and the node's NVIDIA runtime), or use device cpu")
        return list(range(gpu_count))
    if device.startswith("cuda:"):
        index_text = device.removeprefix("cuda:")
        if not index_text.isdigit():
            raise PlacementError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N")
        index = int(index_text)
        if index >= gpu_count:
            raise PlacementError(f"device {device} was asked for but only {gpu_count} GPU(s) are visible")
        return [index]
    raise PlacementError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N")


def _budget(total: int, headroom: float) -> int:
    return max(total - max(int(total * headroom), MIN_HEADROOM_BYTES), 0)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
