"""Load a DeepSeek-family causal LM and its tokenizer from a local path at a chosen precision."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Precision = Literal["bf16", "fp16", "fp32", "int8"]
log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": torch.float32}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    max_position_embeddings: int


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_threads(requested: int | None) -> int:
    """Torch's CPU threads: leave one core to the HTTP event loop, whose thread otherwise fights the
    spinning OpenMP workers (measured on 2 cores: 2 threads gave 40-540 req/s erratically, 1 thread a steady 570)."""
    return requested or max((os.cpu_count() or 2) - 1, 1)


def load_model(path: str | Path, precision: Precision, device: str = "auto",
               torch_threads: int | None = None) -> LoadedModel:
    """Load weights, tokenizer and chat template; int8 means dynamic quantization of Linear layers on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = pick_device(device)
    if target.type == "cpu":
        torch.set_num_threads(cpu_threads(torch_threads))
    if precision == "int8" and target.type != "cpu":
        raise ValueError("precision int8 is dynamic quantization and runs on CPU only; use bf16 or fp16 on a GPU")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model path {path} is not a directory holding config.json and weights")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {path} has no chat template; /v1/chat/completions needs one")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[precision])
    model.to(target)  # type: ignore[arg-type]  # transformers' stub types `to` too narrowly
    model.eval()
    if precision == "int8":
        # torch.ao's eager dynamic quantization is deprecated in favour of torchao but still works in torch 2.15;
        # it keeps this dependency-free. Its warnings say nothing the operator can act on, so they are silenced.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 4096)
    log.info("loaded model %s (%s, %s, max_position_embeddings=%d)", path, precision, target, max_len)
    return LoadedModel(model=model, tokenizer=tokenizer, device=target, max_position_embeddings=max_len)
