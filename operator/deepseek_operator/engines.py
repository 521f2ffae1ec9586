"""The inference engine behind a DeepSeekDeployment's gateway: which one a spec picks, and the vLLM container's
command line and settings (the builtin engine runs inside deepseek-server; its flags are `workloads.server_args`).

Pure functions of the spec as the API returns it (schema defaults applied); defaults are resolved here too, so that
a spec written by hand in a test means the same thing.
"""

from __future__ import annotations

import json
from typing import Any

BUILTIN = "builtin"
VLLM = "vllm"
# The CRD's default for spec.engine.image (a unit test holds the two equal).
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
# vLLM listens on the pod's loopback only: nothing outside the pod reaches it except through the gateway.
VLLM_HOST = "127.0.0.1"
VLLM_PORT = 8001
VLLM_URL = f"http://{VLLM_HOST}:{VLLM_PORT}"
# The CRD's default for spec.server.maxNewTokens: the most completion tokens one request may ask for.
DEFAULT_MAX_NEW_TOKENS = 512
# server.precision -> vLLM's --dtype (the compute dtype). fp8 computes in bf16 with FP8-quantized weights.
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}
VLLM_QUANTIZATION = {"fp8": "fp8"}
# The weights are already in the pod (a volume or the fetch-model init container): vLLM needs no Hub access, and a
# model server inside a company's cluster does not report usage to vLLM's collector. engine.env may override both.
VLLM_BASE_ENV = (("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"))


def engine_name(spec: dict[str, Any]) -> str:
    """`builtin` or `vllm` (an absent `engine` is builtin)."""
    return str((spec.get("engine") or {}).get("name") or BUILTIN)


def uses_vllm(spec: dict[str, Any]) -> bool:
    return engine_name(spec) == VLLM


def vllm_image(spec: dict[str, Any]) -> str:
    return str((spec.get("engine") or {}).get("image") or DEFAULT_VLLM_IMAGE)


def tensor_parallel_size(spec: dict[str, Any]) -> int:
    """vLLM shards the model over every GPU of the replica (at least one: the CRD rejects vllm with 0 GPUs)."""
    return max(1, int((spec.get("resources") or {}).get("gpus", 1)))


def vllm_args(spec: dict[str, Any], model_dir: str, *, shutdown_grace_s: int | None = None) -> list[str]:
    """Arguments of the official image's `vllm serve` entry point, derived from the spec, then engine.extraArgs.

    `shutdown_grace_s`: how long vLLM may finish its running requests after SIGTERM (it aborts them at once by
    default), the same time the gateway in front of it gets.
    """
    server = spec.get("server") or {}
    engine = spec.get("engine") or {}
    precision = str(server.get("precision", "bf16"))
    if precision not in VLLM_DTYPES:
        raise ValueError(f"server.precision {precision!r} is not available with engine vllm "
                         f"(use one of {', '.join(VLLM_DTYPES)})")
    args = [
        model_dir,
        "--host", VLLM_HOST,
        "--port", str(VLLM_PORT),
        "--served-model-name", str(spec["model"]["name"]),
        "--tensor-parallel-size", str(tensor_parallel_size(spec)),
        "--dtype", VLLM_DTYPES[precision],
    ]
    if precision in VLLM_QUANTIZATION:
        args += ["--quantization", VLLM_QUANTIZATION[precision]]
    if server.get("maxBatchSize"):
        args += ["--max-num-seqs", str(server["maxBatchSize"])]
    if server.get("maxModelLen"):
        args += ["--max-model-len", str(server["maxModelLen"])]
    args.append("--enable-prefix-caching" if engine.get("prefixCaching", True) else "--no-enable-prefix-caching")
    # The gateway's completion-token ceiling is vLLM's too: a request without max_tokens then gets at most that many
    # (or what the context leaves), as with the builtin engine, instead of running to the end of the context.
    generation = {"max_new_tokens": int(server.get("maxNewTokens", DEFAULT_MAX_NEW_TOKENS))}
    args += ["--override-generation-config", json.dumps(generation, separators=(",", ":"))]
    if shutdown_grace_s is not None:
        args += ["--shutdown-timeout", str(shutdown_grace_s)]
    return args + [str(arg) for arg in engine.get("extraArgs") or []]


def vllm_env(spec: dict[str, Any]) -> list[dict[str, str]]:
    """The vLLM container's environment: the operator's base settings, then engine.env (which wins on a name)."""
    own = [{"name": str(item["name"]), "value": str(item.get("value", ""))}
           for item in (spec.get("engine") or {}).get("env") or []]
    names = {item["name"] for item in own}
    return [{"name": name, "value": value} for name, value in VLLM_BASE_ENV if name not in names] + own


def engine_fingerprint(spec: dict[str, Any]) -> dict[str, Any] | None:
    """What of spec.engine changes the pods, defaults resolved; None for builtin (its pods do not depend on it)."""
    if not uses_vllm(spec):
        return None
    engine = spec.get("engine") or {}
    return {
        "name": VLLM,
        "image": vllm_image(spec),
        "prefixCaching": bool(engine.get("prefixCaching", True)),
        "extraArgs": [str(arg) for arg in engine.get("extraArgs") or []],
        "env": vllm_env(spec),
    }
