"""Packing a CPU model's Linear weights for oneDNN changes its speed, not its answers."""

from __future__ import annotations

import copy

import pytest
import torch
from deepseek_server.engine.cpu_linear import PackedLinear, ProjectionSlice, pack_linear_layers, packing_supported


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


def test_sibling_projections_share_one_matmul_and_keep_their_answers() -> None:
    if not packing_supported(torch.float32):
        pytest.skip("oneDNN is not available")
    model = tiny_llama(torch.float32)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    inputs = torch.randn(3, 5, 64)
    k_linear = copy.deepcopy(attention.k_proj)
    with torch.inference_mode():
        expected = [layer(inputs) for layer in (attention.q_proj, attention.k_proj, attention.v_proj,
                                                mlp.gate_proj, mlp.up_proj)]
        pack_linear_layers(model)
        assert isinstance(attention.q_proj, ProjectionSlice) and isinstance(mlp.up_proj, ProjectionSlice)
        assert attention.q_proj.group is attention.v_proj.group is not mlp.gate_proj.group
        got = [layer(inputs) for layer in (attention.q_proj, attention.k_proj, attention.v_proj,
                                           mlp.gate_proj, mlp.up_proj)]
        # the shared results are not kept once every member had its part
        assert attention.q_proj.group._output is None and mlp.gate_proj.group._output is None
        # a member asked about another input (or twice) computes again instead of answering for the old one
        other = torch.randn(2, 4, 64)
        torch.testing.assert_close(attention.k_proj(other), k_linear(other), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(attention.k_proj(other), k_linear(other), rtol=1e-4, atol=1e-4)
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
