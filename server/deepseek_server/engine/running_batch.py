"""The tensors of a batch being decoded, and the three edits continuous batching needs on them.

Rows are left-padded: each row of `mask` is zeros then ones, and the KV cache of every layer is [batch, heads, time,
dim] along the same time axis. So two batches join by left-padding the shorter in time and concatenating rows;
finished rows leave by selecting the others; and columns that are padding for every row are cropped from the left.
Position ids are explicit per row, so none of these edits changes what the model computes for a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def cache_is_joinable(cache: Any) -> bool:
    """Only plain per-layer key/value tensors can be padded and concatenated (no sliding-window or hybrid layers)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(
        type(layer) is DynamicLayer and isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4
        and isinstance(layer.values, torch.Tensor) and layer.values.dim() == 4
        for layer in layers
    )


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
        for layer, incoming in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.keys = torch.cat([F.pad(layer.keys, (0, 0, mine, 0)), F.pad(incoming.keys, (0, 0, theirs, 0))])
            layer.values = torch.cat([F.pad(layer.values, (0, 0, mine, 0)),
                                      F.pad(incoming.values, (0, 0, theirs, 0))])
        self.mask = torch.cat([F.pad(self.mask, (mine, 0)), F.pad(other.mask, (theirs, 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order), then crop time columns that are padding for all of them."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        self.crop_padding()

    def crop_padding(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        if start > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]
            self.mask = self.mask[:, start:]
