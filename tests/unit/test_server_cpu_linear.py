"""Packing a CPU model's Linear weights for oneDNN changes its speed, not its answers."""

from __future__ import annotations

import pytest
import torch
from deepseek_server.engine.cpu_linear import PackedLinear, pack_linear_layers, packing_supported


def tiny_llama(dtype: torch.dtype, tied: bool = False):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_gives_the_same_logits(dtype: torch.dtype) -> None:
    if not packing_supported(dtype):
        pytest.skip(f"oneDNN has no packed {dtype} matmul on this CPU")
    model = tiny_llama(dtype)
    ids = torch.tensor([[1, 5, 9, 14, 3], [2, 2, 7, 8, 60]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits.float()
        assert pack_linear_layers(model) == 2 * 7 + 1  # q k v o gate up down per layer, and the output head
        after = model(input_ids=ids).logits.float()
    assert isinstance(model.lm_head, PackedLinear)
    if dtype == torch.bfloat16:
        assert torch.equal(before, after)
    else:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(before.argmax(-1), after.argmax(-1))


def test_a_head_tied_to_the_embeddings_is_not_packed_twice() -> None:
    if not packing_supported(torch.float32):
        pytest.skip("oneDNN is not available")
    model = tiny_llama(torch.float32, tied=True)
    assert pack_linear_layers(model) == 2 * 7
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
