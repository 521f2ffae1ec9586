"""The tensors of a batch being decoded, and the three edits continuous batching needs on them.

Rows are left-padded: each row of `mask` is zeros then ones, and the KV cache of every layer is [batch, heads, time,
dim] along the same time axis. So two batches join by left-padding the shorter in time and concatenating rows;
finished rows leave by selecting the others; and columns that are padding for every row are cropped from the left.
Position ids are explicit per row, so none of these edits changes what the model computes for a row.
A joinable cache's layers are `GrowingLayer`s (see `kv_cache`), so decode steps append in place. With a model
sharded over several devices each layer's cache lives on its own device, so row indexes go to each tensor's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deepseek_server.engine.kv_cache import GrowingLayer


def cache_is_joinable(cache: Any) -> bool:
    """Only plain per-layer key/value tensors can be padded and concatenated (no sliding-window or hybrid layers)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(
        type(layer) in (DynamicLayer, GrowingLayer) and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4
        and isinstance(layer.values, torch.Tensor) and layer.values.dim() == 4
        for layer in layers
    )


def make_growable(cache: Any) -> None:
    """Turn a joinable cache's layers into `GrowingLayer`s, so that later steps write in place."""
    cache.layers = [layer if isinstance(layer, GrowingLayer) else GrowingLayer.from_layer(layer)
                    for layer in cache.layers]


@dataclass
class BatchTensors:
    """mask [B, T], positions [B, 1] (position of each row's last token), logits [B, V], and the KV cache."""

    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    cache: Any

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def join(self, other: BatchTensors) -> None:
        """Append `other`'s rows (both caches must be joinable)."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        mine, theirs = length - self.mask.shape[1], length - other.mask.shape[1]
        # allocate every layer's joined buffers first: running out of memory here leaves the batch untouched
        joined = [layer.prepare_join(incoming)
                  for layer, incoming in zip(self.cache.layers, other.cache.layers, strict=True)]
        for layer, buffers in zip(self.cache.layers, joined, strict=True):
            layer.commit_join(buffers)
        self.mask = torch.cat([F.pad(self.mask, (mine, 0)), F.pad(other.mask, (theirs, 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order), then crop time columns that are padding for all of them."""
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self.cache.layers:
            layer.select(index)
        self.mask = self.mask.index_select(0, index.to(self.mask.device))
        self.positions = self.positions.index_select(0, index.to(self.positions.device))
        self.logits = self.logits.index_select(0, index.to(self.logits.device))
        self.crop_padding()

    def step_mark(self) -> list[int] | None:
        """Where each layer's cache ends now (None when the layers cannot be rolled back), for `roll_back`."""
        layers = self.cache.layers
        if not all(isinstance(layer, GrowingLayer) for layer in layers):
            return None
        return [layer.length for layer in layers]

    def roll_back(self, mark: list[int]) -> None:
        """Undo a decode step that failed part-way: each layer forgets what it wrote past `mark`; the mask and
        positions return to before the step."""
        for layer, length in zip(self.cache.layers, mark, strict=True):
            layer.truncate(length)
        self.mask = self.mask[:, :-1]
        self.positions = self.positions - 1

    def crop_padding(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        if start > 0:
            for layer in self.cache.layers:
                layer.drop_front(start)
            self.mask = self.mask[:, start:]
