"""Linear layers with weights packed once for oneDNN, for decoding on the CPU.

On the CPU the weight matmuls are most of a decode step. `nn.Linear` hands oneDNN (bf16) or MKL (fp32) a plain
weight that the library re-blocks for its kernels on every call; reordering it once at load time into oneDNN's
blocked layout takes that off every step (measured on this 2-core AVX-512/AMX machine at 16 rows: 25-35 % less CPU
per bf16 matmul, 30-40 % per fp32 one). Results stay the same: bit-identical in bf16, and in fp32 a row's result no
longer depends on how many rows share the batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

_PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(torch.nn.Module):
    """`nn.Linear` (CPU, fp32 or bf16) whose weight lives in oneDNN's blocked layout."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.register_buffer("weight", weight, persistent=False)
        self.bias = linear.bias

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FusedProjections:
    """Several projections of the same input (an attention's q/k/v, an MLP's gate/up) computed as one packed matmul.

    At a decode step's few rows a matmul costs little more with a wider output, so one call instead of three (or two)
    saves most of the per-call cost. The model still calls each projection by name, with the same input tensor: the
    first call computes all of them, the others take their slice of that result, and the result is dropped once
    every member had its part. A member called with another input (not what the model code does) computes again.
    """

    def __init__(self, layers: list[torch.nn.Linear]) -> None:
        weight = torch.cat([layer.weight.detach() for layer in layers])
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        biases = [layer.bias for layer in layers]
        self.bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        self.members = len(layers)
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._left = 0

    def output_for(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs is not self._input or self._left == 0:
            self._output = torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), self.weight, self.bias, "none",
                                                              [], "")
            self._input, self._left = inputs, self.members
        output = self._output
        assert output is not None
        self._left -= 1
        if self._left == 0:
            self._input = self._output = None
        return output


class ProjectionSlice(torch.nn.Module):
    """One member of `FusedProjections`: its columns of the shared result (a view, no copy)."""

    def __init__(self, group: FusedProjections, start: int, end: int, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.group, self.start, self.end = group, start, end
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.group.output_for(inputs)[..., self.start:self.end]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, columns={self.start}:{self.end}"


# Sibling projections that read the same input in the model code of llama, qwen2 and deepseek_v3 (dense MLPs and
# shared experts): each group becomes one matmul.
FUSABLE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def packing_supported(dtype: torch.dtype) -> bool:
    """oneDNN's packed matmul exists for this dtype on this CPU."""
    if dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linear_layers(model: Any) -> int:
    """Replace the CPU `nn.Linear` layers of `model` with `PackedLinear` (sibling projections of one input with one
    `FusedProjections`); returns how many layers were replaced.

    Layers sharing their weight with another module (an output head tied to the embeddings) are left alone, so the
    weight is not held twice; subclasses of `nn.Linear` (quantized or otherwise special layers) too.
    """
    counts: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    def packable(child: Any) -> bool:
        return (type(child) is torch.nn.Linear and child.weight.device.type == "cpu"
                and packing_supported(child.weight.dtype) and counts.get(id(child.weight), 0) == 1)

    replaced = 0
    for parent in list(model.modules()):
        for names in FUSABLE_GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            if not all(packable(layer) for layer in layers) or len(
                    {(layer.in_features, layer.weight.dtype, layer.bias is None) for layer in layers}) != 1:
                continue
            group = FusedProjections(layers)
            start = 0
            for name, layer in zip(names, layers, strict=True):
                setattr(parent, name, ProjectionSlice(group, start, start + layer.out_features, layer))
                start += layer.out_features
            replaced += len(layers)
        for name, child in list(parent.named_children()):
            if packable(child):
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    log.info("packed %d linear layers for oneDNN", replaced)
    return replaced
