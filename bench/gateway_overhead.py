"""Benchmark: what the gateway itself costs in front of an OpenAI engine, with the engine's own cost taken out.

A stand-in engine (a raw asyncio HTTP server in its own process, speaking vLLM's streaming dialect) sends N tokens
per request at a fixed pace, so the engine's speed and this machine's noise are the same on both sides. Token i is
due at i+1 intervals after the request, on the engine's own clock, as a GPU engine's step loop produces them whatever
its HTTP front does: a send that was held up (the CPU busy with the gateway, the client or anything else on the
machine) delays that token, not every token after it. `--pacing after-send` sleeps the interval after each send
instead; then every moment the engine process waits for a CPU is added to the rest of the stream, and a gateway on
the same CPUs is charged its whole CPU time per stream as latency. The client
streams completions from it directly and through the gateway (`deepseek-server serve --engine vllm`), alternating,
and the gateway's CPU time is read from /proc. Prints, per concurrency: p50 latency and time to first token direct
and through the gateway (the gateway's added p50, next to its 2 ms target), tokens/s, and the gateway's CPU per
request and per relayed token; then the tokens/s each gateway loses against direct, next to its 3 % target.

    .venv/bin/python bench/gateway_overhead.py                    # 64 tokens, 3 ms apart, concurrency 1, 16, 64
    .venv/bin/python bench/gateway_overhead.py --quick            # a few requests: checks that it runs
    .venv/bin/python bench/gateway_overhead.py --baseline-src DIR # also a gateway from DIR/server (another version,
                                                                  # e.g. `git archive REV server | tar -x -C DIR`)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devcluster.testing.model_server import SigningKey, mint, wait_ready, write_auth_dir
from devcluster.testing.ports import free_port

MODEL = "bench-model"
TARGET_P50_MS = 2.0
TARGET_TOKENS_LOSS_PCT = 3.0


# ------------------------------------------------------------------------------------------------ stand-in engine
def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(document: dict[str, object]) -> bytes:
    return _chunk(b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n")


async def _serve_engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int,
                        interval: float, on_clock: bool) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                           if k.lower() == "content-length"), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == "/health":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            elif path == "/v1/models":
                answer = json.dumps({"object": "list", "data": [{"id": MODEL, "max_model_len": 4096}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(answer), answer))
            elif not body.get("stream"):
                answer = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                                     "choices": [{"index": 0, "text": " tok", "finish_reason": "length"}],
                                     "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
                                    ).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(answer), answer))
            else:
                count = min(tokens, int(body.get("max_tokens") or tokens))
                usage = (body.get("stream_options") or {}).get("include_usage")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
                             b"\r\n\r\n")
                started = time.perf_counter()
                for i in range(count):
                    if on_clock:
                        await asyncio.sleep(max(0.0, started + (i + 1) * interval - time.perf_counter()))
                    else:
                        await asyncio.sleep(interval)
                    choice = {"index": 0, "text": " tok", "logprobs": None,
                              "finish_reason": "length" if i == count - 1 else None, "stop_reason": None}
                    writer.write(_event({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                                         "choices": [choice], **({"usage": None} if usage else {})}))
                    await writer.drain()
                if usage:
                    writer.write(_event({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                                         "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": count,
                                                                  "total_tokens": 5 + count}}))
                writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _run_engine(port: int, tokens: int, interval: float, on_clock: bool) -> None:
    server = await asyncio.start_server(lambda r, w: _serve_engine(r, w, tokens, interval, on_clock), "127.0.0.1",
                                        port)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------------------------ measurement
@dataclass
class Side:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    requests: int = 0
    errors: int = 0


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] * 1000 if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream(client: httpx.AsyncClient, url: str, token: str | None, tokens: int, side: Side) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": tokens, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    started = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for piece in response.aiter_raw():
                if first is None and b'"text"' in piece:
                    first = time.perf_counter()
    except (httpx.HTTPError, RuntimeError) as exc:
        side.errors += 1
        print(f"  error from {url}: {exc}", file=sys.stderr)
        return
    done = time.perf_counter()
    side.latencies.append(done - started)
    side.ttfts.append((first or done) - started)
    side.tokens += tokens


async def _level(url: str, token: str | None, concurrency: int, requests: int, tokens: int, side: Side) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                queue.pop()
                await _stream(client, url, token, tokens, side)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        side.seconds += time.perf_counter() - started
        side.requests += requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few requests per level: checks that it runs")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per streamed answer")
    parser.add_argument("--interval-ms", type=float, default=3.0, help="the stand-in engine's time per token")
    parser.add_argument("--pacing", choices=["clock", "after-send"], default="clock",
                        help="the stand-in engine's tokens due on its own clock (a GPU engine), or an interval after "
                             "each send")
    parser.add_argument("--concurrency", help="levels, comma-separated (default 1,16,64; 1,16 with --quick)")
    parser.add_argument("--requests", type=int, help="requests per side, level and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-src", type=Path, help="also measure the gateway of DIR/server")
    parser.add_argument("--engine", nargs=4, metavar=("PORT", "TOKENS", "INTERVAL_S", "PACING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:  # the stand-in engine process
        asyncio.run(_run_engine(int(args.engine[0]), int(args.engine[1]), float(args.engine[2]),
                                args.engine[3] == "clock"))
        return 0
    levels = [int(c) for c in (args.concurrency or ("1,16" if args.quick else "1,16,64")).split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    key = SigningKey("bench")
    auth = write_auth_dir(work / "auth", [key], default_limits={"rps": 1_000_000, "burst": 1_000_000, "tpm": None,
                                                                  "parallel": None})
    token = mint(key, exp=int(time.time()) + 86400)
    engine_port = free_port()
    with ExitStack() as stack:
        def spawn(name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
            log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed with the stack
            stack.callback(log.close)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
            stack.callback(lambda: (proc.terminate(), proc.wait(30)))
            return proc

        spawn("engine", [sys.executable, __file__, "--engine", str(engine_port), str(args.tokens),
                         str(args.interval_ms / 1000), args.pacing])
        gateways: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        sources = {"gateway": None, **({"baseline": args.baseline_src} if args.baseline_src else {})}
        for name, source in sources.items():
            port = free_port()
            env = {"PYTHONPATH": str(source / "server")} if source else None
            proc = spawn(name, [sys.executable, "-m", "deepseek_server", "serve", "--engine", "vllm", "--engine-url",
                                f"http://127.0.0.1:{engine_port}", "--model-name", MODEL, "--auth-dir", str(auth),
                                "--no-cache", "--host", "127.0.0.1", "--port", str(port), "--audit-log",
                                str(work / f"{name}-audit.jsonl"), "--max-new-tokens", str(args.tokens),
                                "--log-level", "warning"], env)
            gateways[name] = (f"http://127.0.0.1:{port}", proc)
        engine_url = f"http://127.0.0.1:{engine_port}"
        for url, proc in gateways.values():  # ready = the engine answered the gateway's own check
            wait_ready(url, 120, proc)
        targets = {"direct": (engine_url, None, None), **{n: (u, token, p) for n, (u, p) in gateways.items()}}
        for url, tok, _ in targets.values():
            asyncio.run(_level(url, tok, 2, 4, args.tokens, Side()))
        results: dict[int, dict[str, Side]] = {}
        for concurrency in levels:
            requests = args.requests or (max(4, concurrency) if args.quick else max(40, 4 * concurrency))
            results[concurrency] = {name: Side() for name in targets}
            for round_no in range(1 if args.quick else args.rounds):
                order = list(targets) if round_no % 2 == 0 else list(targets)[::-1]
                for name in order:
                    url, tok, proc = targets[name]
                    side = results[concurrency][name]
                    before = cpu_seconds(proc.pid) if proc else 0.0
                    asyncio.run(_level(url, tok, concurrency, requests, args.tokens, side))
                    side.cpu_seconds += (cpu_seconds(proc.pid) - before) if proc else 0.0
    print(f"gateway overhead bench ({'quick' if args.quick else 'full'}): stand-in engine, {args.tokens} tokens "
          f"{args.interval_ms:g} ms apart (pacing: {args.pacing}), streamed; {1 if args.quick else args.rounds} "
          "rounds alternating")
    print(f"{'conc':>4} {'side':<9} {'p50 ms':>8} {'TTFT ms':>8} {'tok/s':>8} {'err':>4} {'CPU ms/req':>10} "
          f"{'CPU us/token':>12}  added p50 (target <= {TARGET_P50_MS:g} ms)")
    for concurrency, by_side in results.items():
        direct = by_side["direct"]
        for name, side in by_side.items():
            tokens_per_s = side.tokens / side.seconds if side.seconds else 0.0
            cpu = ""
            note = ""
            if name != "direct":
                per_request = side.cpu_seconds / max(side.requests, 1) * 1000
                cpu = f"{per_request:>10.2f} {per_request * 1000 / args.tokens:>12.1f}"
                added = p50(side.latencies) - p50(direct.latencies)
                note = f"  {added:+.2f} ms" + ("" if args.quick else " ok" if added <= TARGET_P50_MS else " MISS")
            else:
                cpu = f"{'':>10} {'':>12}"
            print(f"{concurrency:>4} {name:<9} {p50(side.latencies):>8.1f} {p50(side.ttfts):>8.1f} "
                  f"{tokens_per_s:>8.1f} {side.errors:>4} {cpu}{note}")
    print(f"tokens/s lost against direct (target <= {TARGET_TOKENS_LOSS_PCT:g} %):")
    for concurrency, by_side in results.items():
        direct = by_side["direct"]
        direct_rate = direct.tokens / direct.seconds if direct.seconds else 0.0
        for name, side in by_side.items():
            if name == "direct" or not direct_rate or not side.seconds:
                continue
            lost = (1 - side.tokens / side.seconds / direct_rate) * 100
            verdict = "" if args.quick else " ok" if lost <= TARGET_TOKENS_LOSS_PCT else " MISS"
            print(f"{concurrency:>4} {name}: {lost:+.1f} %{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
