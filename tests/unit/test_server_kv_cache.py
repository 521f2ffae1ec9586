"""The growing KV cache layer holds exactly what concatenation would, through growth, joins, leaves and crops."""

from __future__ import annotations

import torch
from deepseek_server.engine.kv_cache import GrowingLayer


def states(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2, length, 4, generator=generator),
            torch.randn(rows, 2, length, 8, generator=generator))  # values may have another head size (MLA)


def test_decode_steps_append_in_place_and_match_concatenation() -> None:
    keys, values = states(3, 5, seed=0)
    layer = GrowingLayer(keys, values)
    first_buffer = layer.keys.untyped_storage().data_ptr()  # type: ignore[union-attr]
    for step in range(200):  # past the first capacity: the buffer grows and keeps every column
        new_keys, new_values = states(3, 1, seed=step + 1)
        returned = layer.update(new_keys, new_values)
        keys, values = torch.cat([keys, new_keys], dim=-2), torch.cat([values, new_values], dim=-2)
        assert torch.equal(returned[0], keys) and torch.equal(returned[1], values)
        if step == 0:
            assert layer.keys.untyped_storage().data_ptr() == first_buffer  # type: ignore[union-attr]
    assert layer.get_seq_length() == 205 and layer.capacity > 205


def test_join_left_pads_the_shorter_batch_with_zeros() -> None:
    long_keys, long_values = states(2, 6, seed=1)
    short_keys, short_values = states(1, 3, seed=2)
    layer, other = GrowingLayer(long_keys, long_values), GrowingLayer(short_keys, short_values)
    layer.join(other)
    assert layer.keys is not None and layer.values is not None
    assert layer.keys.shape == (3, 2, 6, 4) and layer.values.shape == (3, 2, 6, 8)
    assert torch.equal(layer.keys[:2], long_keys) and torch.equal(layer.keys[2:, :, 3:], short_keys)
    assert torch.count_nonzero(layer.keys[2:, :, :3]) == 0 and torch.count_nonzero(layer.values[2:, :, :3]) == 0
    step_keys, step_values = states(3, 1, seed=3)
    layer.update(step_keys, step_values)  # a joined batch keeps decoding
    assert torch.equal(layer.keys[:, :, -1:], step_keys) and layer.get_seq_length() == 7


def test_rows_leave_and_unused_padding_is_dropped() -> None:
    keys, values = states(4, 5, seed=4)
    layer = GrowingLayer(keys, values)
    layer.select(torch.tensor([3, 1]))
    assert layer.keys is not None and torch.equal(layer.keys, keys[[3, 1]])
    layer.drop_front(2)
    assert torch.equal(layer.keys, keys[[3, 1], :, 2:]) and layer.get_seq_length() == 3
    assert layer.values is not None and torch.equal(layer.values, values[[3, 1], :, 2:])
    step_keys, step_values = states(2, 1, seed=5)
    layer.update(step_keys, step_values)
    assert torch.equal(layer.keys[:, :, :3], keys[[3, 1], :, 2:]) and torch.equal(layer.keys[:, :, 3:], step_keys)
