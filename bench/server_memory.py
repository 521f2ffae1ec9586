"""Memory of the builtin model server under distinct requests of every kind, printed side by side (not a test).

A real `deepseek-server serve` process (the tiny model on the CPU, with auth, rate limits, audit and the response
cache) answers requests whose prompts are all different and of many lengths, in every kind a client sends: chat and
text completions, streamed or not, with log-probabilities, in JSON mode. Its resident memory (Rss of
/proc/PID/smaps_rollup) is printed every `--step` requests, and once more after it has been idle for 2 s.
`--before DIR` (the server/ directory of another checkout) runs that server the same way, and the table shows the two
side by side.

    python bench/server_memory.py [--quick] [--requests 2000] [--before DIR]

Growth that levels off is caches filling to their bounds (this server's response cache and history, oneDNN's
compiled matmuls per input shape); growth that does not is a leak. `--quick` sends a few requests: it shows the
script still runs (tests/bench/test_bench_quick.py); its numbers say little.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from devcluster.testing.model_server import SigningKey, mint, wait_ready, write_auth_dir
from devcluster.testing.ports import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL = "deepseek-tiny"
IDLE_S = 2.0
WORDS = ("deepseek", "model", "answer", "question", "code", "reason", "step", "kubernetes", "pod", "node", "operator",
         "resource", "rate", "limit", "gpu", "token", "sign", "verify", "replica", "quick", "brown", "fox", "jumps",
         "lazy", "dog", "hello", "world", "schedule", "burst", "ten", "twenty", "你好", "世界", "模型", "部署")
KINDS = ("chat", "chat stream", "text", "text stream", "text logprobs", "chat logprobs stream", "chat json_object")


def request_of(kind: str, index: int, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """The `index`-th request: its own prompt (3 to 60 words), max_tokens and temperature."""
    prompt = f"{index} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(4, 64), "temperature": rng.choice([0, 0.7, 1])}
    if kind.startswith("chat"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if "stream" in kind:
        body["stream"] = True
    if "logprobs" in kind:
        body.update({"logprobs": True, "top_logprobs": 5} if kind.startswith("chat") else {"logprobs": 5})
    if "json_object" in kind:
        body["response_format"] = {"type": "json_object"}
    return ("/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"), body


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no Rss in /proc/{pid}/smaps_rollup")


async def drive(url: str, pid: int, token: str, requests: int, step: int, concurrency: int
                ) -> tuple[list[tuple[str, int]], dict[int, int]]:
    """Send the requests, `concurrency` at a time; RSS at 0, every `step` requests and after the idle wait."""
    rng = random.Random(1)  # every server gets the same requests
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(concurrency)
    headers = {"authorization": f"Bearer {token}"}

    async def one(client: httpx.AsyncClient, index: int) -> None:
        path, body = request_of(KINDS[index % len(KINDS)], index, rng)
        async with gate, client.stream("POST", path, json=body, headers=headers) as response:
            async for _ in response.aiter_bytes():
                pass
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    samples = [("0", rss_mb(pid))]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for begin in range(0, requests, step):
            await asyncio.gather(*(one(client, i) for i in range(begin, min(begin + step, requests))))
            samples.append((str(min(begin + step, requests)), rss_mb(pid)))
    await asyncio.sleep(IDLE_S)
    samples.append((f"idle {IDLE_S:g} s", rss_mb(pid)))
    return samples, statuses


def measure(server_dir: Path, model: Path, root: Path, args: argparse.Namespace
            ) -> tuple[list[tuple[str, int]], dict[int, int]]:
    """Start `deepseek-server serve` from `server_dir`, drive it, stop it."""
    key = SigningKey(kid="bench")
    auth = write_auth_dir(root / "auth", [key], default_limits={"rps": 1e6, "burst": 1_000_000, "tpm": None,
                                                               "parallel": None})
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(server_dir), str(REPO)])}
    command = [sys.executable, "-m", "deepseek_server", "serve", "--model", str(model), "--model-name", MODEL,
               "--precision", "fp32", "--device", "cpu", "--max-new-tokens", "64", "--auth-dir", str(auth),
               "--audit-log", str(root / "audit.jsonl"), "--port", str(port), "--log-level", "warning"]
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, 180, proc)
        except RuntimeError as exc:  # ServerExited too
            raise RuntimeError(f"the server from {server_dir} did not become ready ({exc}):\n"
                               f"{(root / 'server.log').read_text()[-2000:]}") from exc
        return asyncio.run(drive(url, proc.pid, mint(key, uid="uid-bench"), args.requests, args.step,
                                 args.concurrency))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few requests: checks the script runs")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--step", type=int, default=200, help="print RSS every this many requests")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="the server/ directory of another checkout, measured side by side")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.step, args.concurrency = 28, 14, 4
    from deepseek_server.tiny_model import make_tiny_model

    sides = {"after": REPO / "server", **({"before": Path(args.before).resolve()} if args.before else {})}
    with tempfile.TemporaryDirectory(prefix="server-memory-") as tmp:
        root = Path(tmp)
        model = make_tiny_model("llama", root / "model")
        print(f"deepseek-server memory: tiny llama (hidden 64, 2 layers) fp32 on {os.cpu_count()} CPUs, "
              f"{args.requests} distinct requests ({len(KINDS)} kinds in turn: {', '.join(KINDS)}), "
              f"{args.concurrency} at a time")
        results = {}
        for side, server_dir in sides.items():
            (root / side).mkdir()
            results[side] = measure(server_dir, model, root / side, args)
    names = list(reversed(sides))  # before, after
    header = "".join(f"{name + ' RSS MB':>16}" for name in names)
    print(f"   {'requests':>10}{header}{'   after/before' if len(names) == 2 else ''}")
    for row, (label, _) in enumerate(results["after"][0]):
        values = [results[name][0][row][1] for name in names]
        ratio = f"{values[1] / values[0]:>15.2f}" if len(values) == 2 else ""
        print(f"   {label:>10}" + "".join(f"{v:>16}" for v in values) + ratio)
    for name in names:
        answered = ", ".join(f"{count} x {status}" for status, count in sorted(results[name][1].items()))
        print(f"   {name}: answered {answered}")


if __name__ == "__main__":
    main()
