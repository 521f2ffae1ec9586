"""Each DeepSeek-family architecture (tiny Llama, Qwen2, DeepseekV3) loads through the real path and answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from deepseek_server.app import create_app

from devcluster.testing.model_server import ServerThread, tiny_settings


@pytest.mark.parametrize(("arch", "precision"), [("llama", "fp32"), ("qwen2", "bf16"), ("deepseek_v3", "fp32"),
                                                 ("llama", "int8")])
def test_architecture_loads_and_answers(arch: str, precision: str, tiny_models: dict[str, Path], auth_dir: Path,
                                        token_factory: Callable[..., str]) -> None:
    settings = tiny_settings(tiny_models[arch], auth_dir=auth_dir, precision=precision, model_name=f"tiny-{arch}")
    server = ServerThread(create_app(settings)).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token_factory(), max_retries=0)
        assert [m.id for m in client.models.list().data] == [f"tiny-{arch}"]
        chat = client.chat.completions.create(model=f"tiny-{arch}", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Hello!"}])
        assert chat.usage is not None and chat.usage.completion_tokens >= 1
        assert chat.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.completions.create(model=f"tiny-{arch}", prompt="def add(a, b):", max_tokens=8,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finally:
        server.stop()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_json_mode_and_the_tokenizers_special_tokens_on_each_architecture(
        arch: str, tiny_models: dict[str, Path], auth_dir: Path, token_factory: Callable[..., str]) -> None:
    """A tokenizer can know special tokens past the model's vocabulary (the tiny Qwen2 checkpoint's tokenizer adds
    `<|endoftext|>` there, as a fine-tune that adds tokens without resizing the embeddings does): JSON mode still
    answers, and text that encodes to such a token is refused with 400 rather than failing the generation."""
    settings = tiny_settings(tiny_models[arch], auth_dir=auth_dir, model_name=f"tiny-{arch}")
    server = ServerThread(create_app(settings)).start()
    try:
        engine = server.app.state.services.engine
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token_factory(), max_retries=0)
        for seed in range(3):
            reply = client.chat.completions.create(model=f"tiny-{arch}", max_tokens=48, temperature=0.8, seed=seed,
                                                   messages=[{"role": "user", "content": "Answer in JSON."}],
                                                   response_format={"type": "json_object"})
            content = reply.choices[0].message.content or ""
            assert content.startswith("{"), content
            if reply.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(content), dict), content
        beyond = [token for token in engine.tokenizer.all_special_ids if token >= engine.vocab_size]
        assert bool(beyond) == (arch == "qwen2"), beyond  # the case this test is for is there
        for token in beyond:
            text = f"Hello {engine.tokenizer.convert_ids_to_tokens(token)} there"
            with pytest.raises(openai.BadRequestError) as as_prompt:
                client.completions.create(model=f"tiny-{arch}", prompt=text, max_tokens=4)
            with pytest.raises(openai.BadRequestError) as in_messages:
                client.chat.completions.create(model=f"tiny-{arch}", max_tokens=4,
                                               messages=[{"role": "user", "content": text}])
            for refused, param in ((as_prompt, "prompt"), (in_messages, "messages")):
                assert refused.value.code == "invalid_value" and refused.value.param == param
                assert f"outside the model's vocabulary (0..{engine.vocab_size - 1}): [{token}]" in str(refused.value)
    finally:
        server.stop()


def test_make_tiny_model_cli_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    from deepseek_server.__main__ import main
    from transformers import AutoConfig, AutoTokenizer

    assert main(["make-tiny-model", "--arch", "qwen2", str(tmp_path / "m")]) == 0
    config = AutoConfig.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert config.model_type == "qwen2" and config.hidden_size == 64 and config.num_hidden_layers == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"  # noqa: RUF001
    assert tokenizer.decode(tokenizer.encode("héllo wörld 你好")) == "héllo wörld 你好"


def test_int8_quantizes_every_linear_layer_and_stays_close_to_fp32(tiny_models: dict[str, Path]) -> None:
    import torch
    from deepseek_server.engine.loading import load_model

    full = load_model(tiny_models["llama"], "fp32", "cpu")
    eight = load_model(tiny_models["llama"], "int8", "cpu")
    layers = [type(m) for m in eight.model.modules() if "Linear" in type(m).__name__ and "Params" not in
              type(m).__name__]
    assert layers and all(t.__module__.startswith("torch.ao.nn.quantized.dynamic") for t in layers), layers
    # fp32 on the CPU serves each projection packed (PackedLinear) or as its slice of a fused matmul
    assert len(layers) == len([m for m in full.model.modules()
                               if type(m).__name__ in ("Linear", "PackedLinear", "ProjectionSlice")])

    prompt = torch.tensor([full.tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    with torch.inference_mode():
        greedy = full.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                     do_sample=False, pad_token_id=full.tokenizer.pad_token_id)
        # both models read the same text (prompt + fp32's greedy answer) and predict each next token
        logits_full, logits_eight = full.model(greedy).logits[0], eight.model(greedy).logits[0]
    similarity = torch.nn.functional.cosine_similarity(logits_full, logits_eight, dim=-1)
    assert similarity.min().item() > 0.99, similarity
    agree = (logits_full.argmax(-1) == logits_eight.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"int8 picks fp32's greedy token at only {agree:.0%} of positions"
    first = eight.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False,
                                 pad_token_id=full.tokenizer.pad_token_id)
    assert first[0, -1] == greedy[0, prompt.shape[1]]
