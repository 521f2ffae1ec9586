"""`make-tiny-model` sizes: head_dim 32 by default (the smallest vLLM's CPU attention serves), larger on request."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_default_llama_has_a_head_dim_vllm_serves(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoConfig

    for arch in ("llama", "qwen2"):
        config = AutoConfig.from_pretrained(tiny_models[arch])
        assert config.hidden_size // config.num_attention_heads >= 32, arch


def test_size_flags_shape_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepseek_server.__main__ import main
    from transformers import AutoConfig

    assert main(["make-tiny-model", "--arch", "llama", "--hidden-size", "128", "--layers", "3", "--heads", "2",
                 "--kv-heads", "1", "--intermediate-size", "256", "--max-len", "1024", str(tmp_path / "m")]) == 0
    assert "head_dim 64" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (128, 3, 2, 1, 256, 1024)


def test_sizes_that_cannot_split_into_heads_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepseek_server.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["make-tiny-model", "--hidden-size", "100", "--heads", "3", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert "hidden size 100 is not a multiple of 3 heads" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
