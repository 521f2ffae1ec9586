"""Each DeepSeek-family architecture (tiny Llama, Qwen2, DeepseekV3) loads through the real path and answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from deepseek_server.app import create_app
from server_harness import ServerThread, tiny_settings


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
