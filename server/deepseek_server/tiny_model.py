"""Write a tiny random-weight DeepSeek-family model with an offline-trained byte-level BPE tokenizer.

The output directory looks exactly like a real checkpoint (config.json, safetensors weights, tokenizer.json,
tokenizer_config.json with a DeepSeek-style chat template), so the server loads it through the same
AutoModelForCausalLM/AutoTokenizer path. Nothing is downloaded.
"""

# ruff: noqa: RUF001  (DeepSeek's special tokens really use fullwidth bars)

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ARCHITECTURES = ("llama", "qwen2", "deepseek_v3")
Architecture = Literal["llama", "qwen2", "deepseek_v3"]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"

# DeepSeek-V3/R1's template, reduced to the roles this server accepts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else '' %}"
    "{% if message['role'] in ['system', 'developer'] %}{{ content }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ content }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ content }}" + EOS +
    "{% elif message['role'] == 'tool' %}" + USER + "{{ content }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

_CORPUS = [
    "DeepSeek models answer questions, write code and reason step by step.",
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "def add(a, b):\n    return a + b\n",
    "Kubernetes schedules pods onto nodes; an operator reconciles custom resources.",
    "Rate limits protect the GPUs: ten requests per second with a burst of twenty.",
    "Tokens are signed with Ed25519 and verified by every replica of the server.",
    "0123456789 + - * / = ( ) [ ] { } < > ? ! . , ; : ' \" @ # $ % ^ & _ ~ `",
    "你好，世界。深度求索的模型可以在本地部署。",
]


def train_tokenizer(vocab_size: int = 384):  # type: ignore[no-untyped-def]
    """Train a byte-level BPE tokenizer on a small built-in corpus; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        add_bos_token=False,
    )


@dataclass(frozen=True)
class ModelSize:
    """The shape of a tiny model. The defaults keep head_dim at 32, the smallest vLLM's CPU attention serves."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    intermediate_size: int = 128

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of "
                             f"{self.num_key_value_heads} key/value heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _config(arch: Architecture, size: ModelSize, vocab_size: int, bos: int, eos: int, pad: int,  # type: ignore[no-untyped-def]
            max_len: int):
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=max_len,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    # MLA sets its own head dims; the MoE layers need every head to have its own key/value.
    return DeepseekV3Config(
        **{**common, "num_key_value_heads": size.num_attention_heads},
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    )


def make_tiny_model(arch: Architecture, out: Path, *, seed: int = 0, max_len: int = 512,
                    size: ModelSize | None = None) -> Path:
    """Write a random-weight model of `arch` (default ModelSize: hidden 64, 2 layers) and its tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    bos, eos, pad = ids(BOS), ids(EOS), ids(PAD)
    config = _config(arch, size or ModelSize(), len(tokenizer), bos, eos, pad, max_len)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
