"""Load a DeepSeek-family causal LM and its tokenizer from a local path at a chosen precision.

Where the weights go (CPU, one GPU, or sharded across every GPU the pod sees) and how int8 is done is decided by
`placement.plan_placement`; this module gathers what it needs to know (GPU count and memory, installed packages,
the checkpoint's size) and acts on it. The pod is given exactly its GPUs, so `torch.cuda.device_count()` is the
replica's GPU count: the operator need not pass it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_server.engine.cpu_linear import pack_linear_layers
from deepseek_server.engine.cpus import available_cpus
from deepseek_server.engine.native_memory import bound_onednn_caches
from deepseek_server.engine.placement import Placement, Precision, estimate_model_bytes, plan_placement

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to decode. `device` is where its inputs go: with a sharded model, the first shard's GPU."""

    model: Any
    tokenizer: Any
    device: torch.device
    max_position_embeddings: int


def cpu_threads(requested: int | None) -> int:
    """Torch's CPU threads: as many as asked (the operator passes the replica's CPU request), else one fewer than
    the CPUs this process may use (`cpus.available_cpus`: its affinity, within a cgroup CPU limit), at least one.

    A replica that declares its CPUs gets a thread on each, the HTTP event loop sharing them: measured on 2 cores
    (113M-parameter Llama, 16 streams of 64 tokens), 2 threads gave 190-197 tokens/s against 144 with 1. Without a
    declared count the server does not know what else runs beside it (other replicas on the node, or a test
    cluster's control plane on the same two cores), so it leaves one CPU free."""
    return requested or max(available_cpus() - 1, 1)


def observe_placement(path: str | Path, precision: Precision, device: str) -> Placement:
    """What this machine offers for `path` at `precision` on `device`, decided by `plan_placement`."""
    gpu_count = torch.cuda.device_count() if device != "cpu" else 0
    memory = [torch.cuda.get_device_properties(i).total_memory for i in range(gpu_count)]
    return plan_placement(
        precision, device, gpu_count=gpu_count, gpu_memory_bytes=memory,
        bf16_supported=bool(gpu_count) and torch.cuda.is_bf16_supported(),
        accelerate_available=importlib.util.find_spec("accelerate") is not None,
        bitsandbytes_available=importlib.util.find_spec("bitsandbytes") is not None,
        model_bytes=_checkpoint_model_bytes(Path(path), precision),
    )


def load_model(path: str | Path, precision: Precision, device: str = "auto",
               torch_threads: int | None = None) -> LoadedModel:
    """Load weights, tokenizer and chat template as `plan_placement` decides (see there for the rules)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"model path {path} is not a directory holding config.json and weights")
    bound_onednn_caches()  # before the first CPU matmul makes oneDNN read them
    placement = observe_placement(path, precision, device)
    if placement.input_device.type == "cpu":
        torch.set_num_threads(cpu_threads(torch_threads))
        log.info("torch runs on %d CPU threads", torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {path} has no chat template; /v1/chat/completions needs one")
    model = AutoModelForCausalLM.from_pretrained(path, **placement.from_pretrained_kwargs())
    _refuse_offload(model)
    model = prepare_for_decoding(model, placement)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 4096)
    input_device = model.get_input_embeddings().weight.device
    log.info("loaded model %s (%s: %s, inputs on %s, max_position_embeddings=%d)", path, precision,
             placement.describe(), input_device, max_len)
    return LoadedModel(model=model, tokenizer=tokenizer, device=input_device, max_position_embeddings=max_len)


def prepare_for_decoding(model: Any, placement: Placement) -> Any:
    """Eval mode, then what the placement asks of the CPU: dynamic int8 quantization, or oneDNN-packed weights."""
    model.eval()
    if placement.quantization == "dynamic-int8":
        # torch.ao's eager dynamic quantization is deprecated in favour of torchao but still works in torch 2.15;
        # it keeps this dependency-free. Its warnings say nothing the operator can act on, so they are silenced.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if placement.quantization == "bitsandbytes-int8":
        quiet_int8_casts()
    if placement.input_device.type == "cpu":
        pack_linear_layers(model)
    return model


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs a warning from every 8-bit matmul whose input is not fp16 ("MatMul8bitLt: inputs will be
    cast from torch.bfloat16 to float16 during quantization"): 7 lines per layer and decode step, 14,448 lines from
    16 requests of 128 tokens on an 8-layer model. The cast is how LLM.int8 works (the rest of the model stays in
    bf16 for its range), so the notice says nothing to act on; other bitsandbytes messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("MatMul8bitLt: inputs will be cast"))


def quiet_int8_casts() -> None:
    """Drop bitsandbytes' per-call cast notice (see `_DropInt8CastNotice`); idempotent."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in logger.filters):
        logger.addFilter(_DropInt8CastNotice())


def _checkpoint_model_bytes(path: Path, precision: Precision) -> int | None:
    """The weights' size at `precision`, from the checkpoint's safetensors files (None when there are none)."""
    files = list(path.glob("*.safetensors"))
    if not files:
        return None
    stored = None
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        stored = data.get("dtype") or data.get("torch_dtype")
    return estimate_model_bytes(sum(f.stat().st_size for f in files), stored, precision)


def _refuse_offload(model: Any) -> None:
    """A layer left on the CPU or disk would make every step crawl: fail instead of serving that slowly."""
    offloaded = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} & {"cpu", "disk"})
    if offloaded and any(isinstance(d, int) or str(d).startswith("cuda")
                         for d in model.hf_device_map.values()):
        raise ValueError(f"the model does not fit in the GPUs' memory: parts were placed on {', '.join(offloaded)}; "
                         "give the replica more GPUs (resources.gpus) or use precision int8")
