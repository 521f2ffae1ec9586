"""The `vllm/vllm-openai` image's entry point (`vllm serve MODEL [flags]`), run by devcluster as a local process.

devcluster maps the image to ``python vllm_entry.py --vllm-venv DIR -- <pod args>``; the pod args are exactly what a
real cluster passes to the real image (first positional: the model). This script execs vLLM's OpenAI server from
the CPU build in DIR (see devcluster.vllm_env). Stdlib only, so any Python runs it.

What a CPU process cannot honour is changed here, one log line each, never silently:
- tensor/pipeline/data parallel sizes become 1: devcluster's GPUs are simulated Node capacity, the process has none;
- flag values that need GPU kernels the CPU build lacks are dropped (see GPU_ONLY_FLAGS).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Parallelism over GPUs: on CPU one process serves the whole model.
PARALLEL_FLAGS = {
    "--tensor-parallel-size": "-tp",
    "--pipeline-parallel-size": "-pp",
    "--data-parallel-size": "-dp",
}
# Flag values the CPU build accepts on its command line but cannot run (measured with vLLM 0.32.0): fp8 weights
# need the GPU kernel `_C::static_scaled_fp8_quant`, and the engine dies while loading. Dropping the flag serves the
# same model unquantized in the given --dtype. (--gpu-memory-utilization is accepted and ignored on CPU: kept.)
GPU_ONLY_FLAGS: dict[str, set[str]] = {"--quantization": {"fp8"}}
FLAG_ALIASES = {"-q": "--quantization", **{alias: name for name, alias in PARALLEL_FLAGS.items()}}
# Defaults for a process on a shared development machine; a pod's own env wins.
DEFAULT_ENV = {
    # GiB of KV cache; unset, vLLM takes --gpu-memory-utilization (0.9) of the machine's memory, on a shared one
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # models come from volumes; the machine has no route to the Hub
}


def log(msg: str) -> None:
    print(f"[devcluster vllm] {msg}", file=sys.stderr, flush=True)


def _split(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, value = arg.split("=", 1)
        return name, value
    return arg, None


def server_args(pod_args: list[str]) -> tuple[list[str], list[str]]:
    """`vllm serve` arguments -> (api_server arguments, notes on what was changed for the CPU build)."""
    args = list(pod_args)
    notes: list[str] = []
    out: list[str] = []
    if args and args[0] == "serve":  # `vllm serve ...` written out in args
        args = args[1:]
    if args and not args[0].startswith("-"):
        out += ["--model", args[0]]
        args = args[1:]
    i = 0
    while i < len(args):
        name, value = _split(args[i])
        name = FLAG_ALIASES.get(name, name)
        takes_next = value is None and i + 1 < len(args) and not args[i + 1].startswith("-")
        if name in PARALLEL_FLAGS or name in GPU_ONLY_FLAGS:
            if value is None and takes_next:
                value = args[i + 1]
                i += 1
            i += 1
            if name in PARALLEL_FLAGS:
                if value not in (None, "1"):
                    notes.append(f"{name} {value} -> 1: devcluster's GPUs are simulated, vLLM runs on this CPU")
                continue
            if (value or "") in GPU_ONLY_FLAGS[name]:
                notes.append(f"dropped {name} {value}: vLLM's CPU build cannot run it (GPU kernels only)")
                continue
            out += [name, value] if value is not None else [name]
            continue
        out.append(args[i])
        i += 1
    return out, notes


def server_env(env: dict[str, str]) -> dict[str, str]:
    """The pod's environment with DEFAULT_ENV filled in where the pod left a variable unset."""
    return {**DEFAULT_ENV, **env}


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "--vllm-venv" or argv[2] != "--":
        log("usage: vllm_entry.py --vllm-venv DIR -- MODEL [vllm serve flags]")
        return 2
    venv, pod_args = Path(argv[1]), argv[3:]
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"vLLM is not installed: no {python}. Run `make vllm-env` (creates {venv}, ~6 GB, once) "
            "and restart the pod.")
        return 1
    args, notes = server_args(pod_args)
    for note in notes:
        log(note)
    if "--model" not in args and not any(a.startswith("--model=") for a in args):
        log("no model given: the first argument must be the model (a path or name), as for `vllm serve`")
        return 2
    cmd = [str(python), "-m", SERVER_MODULE, *args]
    log("exec " + " ".join(cmd))
    os.execve(str(python), cmd, server_env(dict(os.environ)))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
