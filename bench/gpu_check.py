"""The built-in engine on a GPU: batched tokens/s at concurrency 1/16/64 against plain sequential `generate`; each
request parameter the engine honours (sampling, seeds, logit bias, penalties, log-probabilities, JSON output) checked
on the device in one mixed batch; and 8-bit (bitsandbytes) loading through the server's own loading path. Ratios
measured side by side in one run. Exits 1 when a parameter check fails.

    bash bench/gpu_check.sh           # deepseek-llm-7b's shape, random weights, bf16, on the GPU (2-3 minutes)
    bash bench/gpu_check.sh --tiny    # the same code on the CPU with a tiny model (a minute), to try the script
                                      # (--quick is the same; tests/bench/test_bench_quick.py runs it)

It needs torch, transformers and accelerate, plus the engine's xgrammar (with pydantic) and, for the 8-bit part,
bitsandbytes, which bench/gpu_check.sh installs from wheels in .whl/ where they are missing. It imports the engine
modules from server/ and nothing of the HTTP server (no FastAPI), and builds its model in memory (no download, no
network).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

# deepseek-llm-7b-base/chat's config.json (LlamaForCausalLM)
SIZES: dict[str, dict[str, Any]] = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=102400, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=10000.0),
    # ~100M parameters, head_dim 64: what the CPU benchmarks serve
    "100m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=384, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=384, max_position_embeddings=512),
}
PROMPT_WORDS = "Explain how Kubernetes schedules a pod that asks for a GPU, step by step."


def require_modules() -> None:
    """Fail with one line that names what is missing, before anything slow starts."""
    missing = [name for name in ("torch", "transformers", "tokenizers") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"gpu_check: missing Python packages {', '.join(missing)}; this check needs torch, transformers "
                 "(with tokenizers) and, on a GPU, accelerate")
    if importlib.util.find_spec("xgrammar") is None:  # the engine compiles its JSON grammar as it starts
        sys.exit("gpu_check: the built-in engine needs xgrammar (and pydantic); run bench/gpu_check.sh, which "
                 "installs them from .whl/ (fill it with `bash bench/gpu_check.sh --wheels` where PyPI is reachable)")
    try:
        import deepseek_server.engine.batched  # noqa: F401  (the engine and only the engine)
    except ImportError as exc:
        sys.exit(f"gpu_check: the built-in engine does not import here ({exc}); run from the repository root")


def build_tokenizer() -> Any:
    from deepseek_server.tiny_model import train_tokenizer

    return train_tokenizer()


def build_model(size: str, device: str, dtype: Any, layers: int | None = None) -> Any:
    """A random-weight LlamaForCausalLM of `size`, created directly on `device` (no CPU copy, nothing saved)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    shape = dict(SIZES[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    # no EOS: every request produces exactly its token budget, so runs compare like for like
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=None, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=None, pad_token_id=2)
    return model.eval()


def prompts_for(tokenizer: Any, count: int) -> list[list[int]]:
    return [tokenizer.encode(f"Request {i}: {PROMPT_WORDS}") for i in range(count)]


def sequential_rate(model: Any, tokenizer: Any, device: str, prompts: list[list[int]], new_tokens: int) -> float:
    """tokens/s of plain `generate`, one request after another (greedy, fixed length)."""
    import torch

    def run(batch: list[list[int]]) -> tuple[int, float]:
        produced, started = 0, time.perf_counter()
        with torch.inference_mode():
            for prompt in batch:
                ids = torch.tensor([prompt], device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                produced += int(out.shape[1] - ids.shape[1])
        synchronize(device)
        return produced, time.perf_counter() - started

    run(prompts[:1])  # warm-up
    produced, seconds = run(prompts)
    return produced / seconds


def engine_rate(loaded: Any, prompts: list[list[int]], new_tokens: int, rounds: int = 1) -> tuple[float, float]:
    """tokens/s of the built-in engine with all `prompts` submitted at once, and the mean time to first token."""
    from deepseek_server.engine.base import GenerationRequest, TextDelta
    from deepseek_server.engine.batched import BatchedEngine

    engine = BatchedEngine(loaded, model_name="gpu-check", max_batch_size=len(prompts), max_new_tokens=new_tokens,
                           batch_wait_s=0.005)

    async def one(prompt: list[int], started: float) -> tuple[int, float]:
        stream = engine.submit(GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens, temperature=0.0))
        first: float | None = None
        async for event in stream.events():
            if first is None and isinstance(event, TextDelta):
                first = time.perf_counter() - started
        assert stream.result is not None
        return stream.result.completion_tokens, first or 0.0

    async def measure() -> tuple[float, float]:
        await engine.start()
        try:
            await asyncio.gather(*(one(p, time.perf_counter()) for p in prompts[:2]))  # warm-up
            produced, seconds, ttfts = 0, 0.0, []
            for _ in range(rounds):
                started = time.perf_counter()
                results = await asyncio.gather(*(one(p, started) for p in prompts))
                seconds += time.perf_counter() - started
                produced += sum(tokens for tokens, _ in results)
                ttfts += [first for _, first in results]
            return produced / seconds, sum(ttfts) / len(ttfts)
        finally:
            await engine.stop()

    return asyncio.run(measure())


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_loaded(size: str, args: argparse.Namespace, dtype: Any, tokenizer: Any) -> Any:
    """A random-weight model of `size` as the engine gets it from `load_model` (on a CPU: packed weights)."""
    from deepseek_server.engine.loading import LoadedModel

    model = build_model(size, args.device, dtype)
    if args.device == "cpu":
        from deepseek_server.engine.loading import prepare_for_decoding
        from deepseek_server.engine.placement import plan_placement

        model = prepare_for_decoding(model, plan_placement(args.dtype, "cpu", gpu_count=0))
    return LoadedModel(model=model, tokenizer=tokenizer, device=model.get_input_embeddings().weight.device,
                       max_position_embeddings=model.config.max_position_embeddings)


def level_rows(loaded: Any, prompts: list[list[int]], levels: list[int], args: argparse.Namespace,
               seq: float | None, *, with_target: bool = True) -> None:
    for level in levels:
        rate, ttft = engine_rate(loaded, prompts[:level], args.new_tokens, args.rounds)
        ratio = f"{rate / seq:.1f}x" if seq else "-"
        target = "  (target >= 10x)" if level == 64 and seq and with_target else ""
        print(f"{level:>11} {rate:>13.1f} {1000 * ttft:>9.1f} {ratio:>14}{target}")


def throughput(args: argparse.Namespace, dtype: Any) -> None:
    tokenizer = build_tokenizer()
    started = time.perf_counter()
    loaded = build_loaded(args.size, args, dtype, tokenizer)  # packed on a CPU, for both contestants
    model = loaded.model
    synchronize(args.device)
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    print(f"model: random-weight Llama, {args.size} shape, {params / 1e6:.0f}M parameters, {args.dtype}, "
          f"built on {args.device} in {time.perf_counter() - started:.1f} s")
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = prompts_for(tokenizer, max(levels))
    seq = None
    if not args.skip_sequential:
        seq = sequential_rate(model, tokenizer, args.device, prompts[:args.sequential_requests], args.new_tokens)
        print(f"sequential generate: {seq:.1f} tok/s ({args.sequential_requests} requests x {args.new_tokens} tokens)")
    print(f"{'concurrency':>11} {'engine tok/s':>13} {'TTFT ms':>9} {'vs sequential':>14}")
    level_rows(loaded, prompts, levels, args, seq)
    if args.compare_cudnn_attention and args.device.startswith("cuda"):
        cudnn_attention_rows(loaded, prompts, levels, args, seq)
    if args.device.startswith("cuda"):
        import torch

        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model, loaded
    gc.collect()


def cudnn_attention_rows(loaded: Any, prompts: list[list[int]], levels: list[int], args: argparse.Namespace,
                         seq: float | None) -> None:
    """The same levels with SDPA's cuDNN backend allowed, as PyTorch has it by default (the engine turns it off)."""
    import torch
    from deepseek_server.engine import batched

    keep = batched.prefer_fused_attention
    batched.prefer_fused_attention = lambda: torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        print("with SDPA's cuDNN backend allowed (PyTorch's default):")
        level_rows(loaded, prompts, levels, args, seq, with_target=False)
    finally:
        batched.prefer_fused_attention = keep
        torch.backends.cuda.enable_cudnn_sdp(False)


def features(args: argparse.Namespace, dtype: Any) -> bool:
    """Each request parameter the engine honours, run on the device with every row in one batch, as a server mixes
    them: greedy, seeded and pooled sampling, logit bias, penalties, log-probabilities and JSON output. Returns
    whether every check held."""
    import json

    from deepseek_server.engine.base import ANY_JSON_OBJECT, GenerationRequest, TextDelta
    from deepseek_server.engine.batched import BatchedEngine

    tokenizer = build_tokenizer()
    loaded = build_loaded(args.features_size, args, dtype, tokenizer)
    prompt, n = tokenizer.encode(PROMPT_WORDS), args.features_tokens
    favourite = tokenizer.encode("Kubernetes")[0]
    cases: dict[str, list[GenerationRequest]] = {
        "greedy, twice": [GenerationRequest(prompt, n, temperature=0.0)] * 2,
        "seed, twice": [GenerationRequest(prompt, n, temperature=0.9, top_p=0.9, seed=7)] * 2,
        "sampled": [GenerationRequest(prompt, n, temperature=0.8, top_p=0.95)],
        "logit_bias +100": [GenerationRequest(prompt, n, temperature=0.8, logit_bias=((favourite, 100.0),),
                                              logprobs=0)],
        "frequency/presence penalty": [GenerationRequest(prompt, n, temperature=0.0, presence_penalty=2.0,
                                                         frequency_penalty=100.0, logprobs=0)],
        "logprobs, top 3": [GenerationRequest(prompt, n, temperature=0.0, logprobs=3)],
        "JSON object": [GenerationRequest(prompt, 2 * n, temperature=0.8, seed=s, json_schema=ANY_JSON_OBJECT)
                        for s in range(6)],
    }
    rows = sum(len(requests) for requests in cases.values())
    batches: list[int] = []
    engine = BatchedEngine(loaded, model_name="gpu-check", max_batch_size=rows, max_new_tokens=2 * n,
                           batch_wait_s=0.02, on_batch=batches.append)

    async def one(request: GenerationRequest) -> tuple[str, list[Any], Any]:
        stream = engine.submit(request)
        text, logprobs = [], []
        async for event in stream.events():
            if isinstance(event, TextDelta):
                text.append(event.text)
                logprobs.extend(event.logprobs)
        return "".join(text), logprobs, stream.result

    async def run_all() -> list[list[tuple[str, list[Any], Any]]]:
        await engine.start()
        try:
            results = await asyncio.gather(*(one(r) for requests in cases.values() for r in requests))
        finally:
            await engine.stop()
        out, at = [], 0
        for requests in cases.values():
            out.append(list(results[at:at + len(requests)]))
            at += len(requests)
        return out

    outcome = dict(zip(cases, asyncio.run(run_all()), strict=True))

    def check(name: str) -> str:
        got = outcome[name]
        if name in ("greedy, twice", "seed, twice"):
            return "ok" if got[0][0] == got[1][0] and got[0][2] == got[1][2] else "the two texts differ"
        if name == "sampled":
            return "ok" if got[0][2].completion_tokens > 0 else "no tokens"
        if name == "logit_bias +100":
            tokens = [lp.token for lp in got[0][1]]
            wanted = str(tokenizer.decode([favourite]))
            return "ok" if tokens and all(t == wanted for t in tokens) else f"tokens {tokens[:5]} are not {wanted!r}"
        if name == "frequency/presence penalty":
            # incomplete UTF-8 pieces all read as U+FFFD, whatever their ids: leave them out
            tokens = [lp.token for lp in got[0][1] if "\ufffd" not in lp.token]
            distinct = len(set(tokens)) / max(1, len(tokens))
            return "ok" if tokens and distinct == 1 else f"{distinct:.0%} of {len(tokens)} tokens distinct"
        if name == "logprobs, top 3":
            entries = got[0][1]
            bad = [lp for lp in entries if len(lp.top) != 3 or lp.logprob > 0
                   or [v for _, v in lp.top] != sorted((v for _, v in lp.top), reverse=True)
                   or abs(lp.logprob - lp.top[0][1]) > 1e-3]  # greedy picks the most likely
            return "ok" if entries and not bad else f"{len(bad)} of {len(entries)} entries malformed"
        finished = [text for text, _, result in got if result.finish_reason == "stop"]
        if not all(text.startswith("{") for text, _, _ in got):
            return "an output does not start with '{'"
        try:
            if not finished or not all(isinstance(json.loads(text), dict) for text in finished):
                return "no output completed its JSON object" if not finished else "an output is not an object"
        except ValueError as exc:
            return f"an output that ended does not parse: {exc}"
        return f"ok ({len(finished)} of {len(got)} completed within {2 * n} tokens)"

    print(f"\nrequest parameters on {loaded.device} ({args.features_size} shape, {args.dtype}), {rows} requests "
          f"submitted together, largest batch {max(batches, default=0)} rows:")
    results = {name: check(name) for name in cases}
    for name, result in results.items():
        print(f"  {name:<28} {len(cases[name]):>2} row(s)  {result}")
    ok = all(result.startswith("ok") for result in results.values())
    print("features: all ok" if ok else "features: FAILED")
    del loaded
    gc.collect()
    return ok


def int8_loading(args: argparse.Namespace, dtype: Any) -> None:
    """Save a shallower model of the same width, load it through `load_model` in bf16 and in int8, and compare."""
    import torch
    from deepseek_server.engine.loading import load_model, observe_placement

    on_gpu = args.device.startswith("cuda")
    if on_gpu and importlib.util.find_spec("bitsandbytes") is None:
        print("8-bit loading: skipped, bitsandbytes is not installed (bench/gpu_check.sh installs it from .whl/)")
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        path = Path(tmp) / "model"
        model = build_model(args.size, args.device, dtype, layers=args.int8_layers)
        model.save_pretrained(path)
        build_tokenizer().save_pretrained(path)
        del model
        gc.collect()
        prompts = prompts_for(build_tokenizer(), 16)
        device = "cuda" if on_gpu else "cpu"
        print(f"\n8-bit loading: {args.size} width, {args.int8_layers} layers, through load_model (16 requests)")
        rows = []
        for precision in (args.dtype, "int8"):
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated() if on_gpu else 0
            started = time.perf_counter()
            try:
                print(f"  {precision}: {observe_placement(path, precision, device).describe()}")  # type: ignore[arg-type]
                loaded = load_model(path, precision, device)  # type: ignore[arg-type]
            except Exception as exc:  # report and go on: the throughput figures above stand on their own
                print(f"  {precision}: loading failed: {type(exc).__name__}: {exc}")
                continue
            seconds = time.perf_counter() - started
            memory = (torch.cuda.memory_allocated() - before) if on_gpu else 0
            rate, _ = engine_rate(loaded, prompts, args.new_tokens)
            linear = type(loaded.model.model.layers[0].mlp.down_proj)
            kind = f"{linear.__module__.replace('.modules', '')}.{linear.__name__} on {loaded.device}"
            rows.append((precision, seconds, memory, rate, kind))
            del loaded
        print(f"{'precision':>9} {'load s':>7} {'GPU MiB':>8} {'tok/s':>8}  linear layer")
        for precision, seconds, memory, rate, kind in rows:
            print(f"{precision:>9} {seconds:>7.1f} {memory / 2**20:>8.0f} {rate:>8.1f}  {kind}")
        if on_gpu and len(rows) == 2 and rows[0][2]:
            print(f"int8 weights take {rows[1][2] / rows[0][2]:.2f}x the memory of {args.dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per concurrency level")
    parser.add_argument("--sequential-requests", type=int, default=4)
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--int8-layers", type=int, default=8, help="depth of the model saved for the 8-bit part")
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-features", action="store_true")
    parser.add_argument("--features-size", choices=sorted(SIZES), default="100m",
                        help="the model for the request-parameter checks (its vocabulary must be the tokenizer's)")
    parser.add_argument("--features-tokens", type=int, default=48)
    parser.add_argument("--compare-cudnn-attention", action="store_true",
                        help="on a GPU, measure the levels again with SDPA's cuDNN backend allowed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--tiny", "--quick", dest="tiny", action="store_true",
                        help="a tiny model on the CPU, a few tokens: tries the script")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.device, args.dtype, args.concurrency = "tiny", "cpu", "fp32", "1,4"
        args.new_tokens, args.sequential_requests, args.int8_layers, args.threads = 8, 2, 2, args.threads or 1
        args.features_size, args.features_tokens = "tiny", 24
    require_modules()
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (use --device cpu --size tiny to try the script on a CPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"gpu_check: torch {torch.__version__}, {where}, {torch.cuda.device_count()} GPU(s) visible")
    if not args.skip_throughput:
        throughput(args, dtype)
    ok = args.skip_features or features(args, dtype)
    if not args.skip_int8:
        int8_loading(args, dtype)
    if not ok:
        sys.exit("gpu_check: a request parameter did not behave on this device (see the table above)")


if __name__ == "__main__":
    main()
