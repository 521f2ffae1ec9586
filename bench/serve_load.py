"""Load benchmark of the model server, printed as ratios measured side by side in one run (not a test).

1. The latency table on the tiny model: concurrency 10/50/100 -> avg and p95 latency, error rate,
   requests/s, tokens/s, time to first token (a real server process, full auth + limits + metrics + audit).
2. The batched engine vs plain sequential `model.generate` at 16 concurrent requests (target >= 5x tokens/s).
3. The cost of auth + limits + metrics + audit vs the same app with them off, on a no-op engine (targets:
   <= 3 % wall and <= 10 % server CPU per request). `--before DIR` runs another checkout's pair in the same
   rounds. The client's own CPU per request is printed beside them: where it is as long as the wall time, the client
   sets the pace, and the wall column shows the client's extra work (the token it sends, the headers it reads).
4. With `--instructions` (needs valgrind): the same pair's instructions per request, counted by callgrind, the mean of
   several starts of each server (`--instruction-seeds`, hash seeds 1..N: each start is another memory layout, and
   the layout moves a count by up to 1 %). CPU time on a shared 2-core machine moves by tens of percent between
   rounds; a count repeats within a few tenths of a percent for the same start, at any load. Counts stand in for CPU
   time: cache misses and the kernel are not in them. `--instruction-concurrency 10` counts a server that always has
   requests waiting (the client is the fast side under valgrind).

    python bench/serve_load.py [--quick] [--arch llama]
    python bench/serve_load.py --skip table,batching,overhead --instructions [--before DIR]

`--quick` runs each part small (a few requests, low concurrency): it shows the script still runs
(tests/bench/test_bench_quick.py); its numbers say little.

Absolute numbers depend on the machine; the ratios are the point. No GPU run here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from devcluster.testing.model_server import SigningKey, mint, write_auth_dir
from devcluster.testing.ports import free_port

MODEL = "deepseek-tiny"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(round(q * (len(ordered) - 1)), len(ordered) - 1)] if ordered else float("nan")


# -- servers in their own processes (so the load generator does not share their GIL) --------------------------


# Part 3 pins the servers to one CPU and this process (the clients) to another, where there are two or more, so that
# a server's CPU per request is not moved by sharing its core with the load it is measured under.
SERVER_CPU, CLIENT_CPU = 1, 0


def _pinning() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


def _run_server(settings_json: str, engine_kind: str, record: bool, port: int, source: str | None = None,
                pin: bool = False) -> None:
    import logging

    if pin:  # before any thread starts: they all inherit it
        os.sched_setaffinity(0, {SERVER_CPU})

    if source is not None:  # another copy of the server package (e.g. a checkout of an earlier commit)
        sys.path.insert(0, source)

    import uvicorn
    from deepseek_server.app import create_app
    from deepseek_server.engine.noop import NoopEngine
    from deepseek_server.settings import ServerSettings

    try:  # `deepseek-server serve`'s HTTP protocol, where the server (another checkout's too) has one
        from deepseek_server.http_protocol import OpenAIErrorsHTTPProtocol as protocol
    except ImportError:
        protocol = "auto"

    logging.basicConfig(level=logging.WARNING)
    settings = ServerSettings(**json.loads(settings_json))
    engine = NoopEngine(model_name=MODEL) if engine_kind == "noop" else None
    app = create_app(settings, engine=engine, record_requests=record)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, http=protocol,
                timeout_keep_alive=settings.keep_alive_s, server_header=False)  # as `deepseek-server serve` runs it


class ServerProcess:
    def __init__(self, settings: dict[str, Any], engine_kind: str = "model", record: bool = True,
                 source: str | None = None, pin: bool = False) -> None:
        self.port = free_port()
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_run_server, args=(json.dumps(settings, default=str), engine_kind, record,
                                                          self.port, source, pin), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.proc.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if not self.proc.is_alive():
                raise RuntimeError(f"benchmark server exited with {self.proc.exitcode} before it was ready")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("benchmark server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.join(30)


def auth_setup(root: Path) -> tuple[Path, str]:
    """An auth directory with one key and generous limits, and a token for it."""
    key = SigningKey(kid="bench")
    directory = write_auth_dir(root / "auth", [key], default_limits={"rps": 1e6, "burst": 1_000_000,
                                                                      "tpm": None, "parallel": None})
    return directory, mint(key, uid="uid-bench")


# -- 1. latency table -----------------------------------------------------------------------------------------


async def one_streamed_request(client: httpx.AsyncClient, token: str, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                                 json={"model": MODEL, "max_tokens": max_tokens, "stream": True,
                                       "stream_options": {"include_usage": True},
                                       "messages": [{"role": "user", "content": "Tell me about DeepSeek."}]}) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "latency": time.perf_counter() - started, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif ttft is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - started
    except httpx.HTTPError as exc:
        return {"ok": False, "latency": time.perf_counter() - started, "error": type(exc).__name__}
    return {"ok": True, "latency": time.perf_counter() - started, "ttft": ttft, "tokens": tokens}


async def load_level(url: str, token: str, concurrency: int, requests_per_worker: int, max_tokens: int
                     ) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        results: list[dict[str, Any]] = []

        async def worker() -> None:
            for _ in range(requests_per_worker):
                results.append(await one_streamed_request(client, token, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    errors = sorted({r["error"] for r in results if not r["ok"]})
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    return {
        "concurrency": concurrency, "requests": len(results),
        "avg_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        "errors_pct": 100 * (len(results) - len(ok)) / len(results),
        "rps": len(ok) / wall, "tokens_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_avg_ms": 1000 * statistics.fmean(ttfts) if ttfts else float("nan"),
        "ttft_p95_ms": 1000 * percentile(ttfts, 0.95), "errors": ", ".join(errors),
    }


def latency_table(model_dir: Path, root: Path, quick: bool) -> None:
    auth_dir, token = auth_setup(root)
    settings = {"model": str(model_dir), "model_name": MODEL, "precision": "fp32", "device": "cpu",
                "auth_dir": str(auth_dir), "audit_log": str(root / "audit.jsonl"), "max_batch_size": 32,
                "max_new_tokens": 64, "max_model_len": 512}
    max_tokens = 16
    print(f"\n1. Latency table: tiny model, full stack (auth, limits, metrics, audit), streamed chat, "
          f"max_tokens={max_tokens}, max_batch_size=32")
    print(f"{'conc':>5} {'reqs':>5} {'avg ms':>8} {'p95 ms':>8} {'err %':>6} {'req/s':>7} {'tok/s':>8} "
          f"{'TTFT avg':>9} {'TTFT p95':>9}")
    with ServerProcess(settings) as server:
        asyncio.run(load_level(server.url, token, 4, 2, max_tokens))  # warm-up
        for concurrency in (2, 4) if quick else (10, 50, 100):
            per_worker = 1 if quick else 4
            row = asyncio.run(load_level(server.url, token, concurrency, per_worker, max_tokens))
            print(f"{row['concurrency']:>5} {row['requests']:>5} {row['avg_ms']:>8.1f} {row['p95_ms']:>8.1f} "
                  f"{row['errors_pct']:>6.1f} {row['rps']:>7.1f} {row['tokens_s']:>8.1f} "
                  f"{row['ttft_avg_ms']:>9.1f} {row['ttft_p95_ms']:>9.1f}  {row['errors']}")


# -- 2. batched engine vs sequential generate ----------------------------------------------------------------


def batched_vs_sequential(model_dir: Path, concurrent: int, new_tokens: int) -> None:
    import torch
    from deepseek_server.engine.base import GenerationRequest
    from deepseek_server.engine.batched import BatchedEngine
    from deepseek_server.engine.loading import load_model

    loaded = load_model(model_dir, "fp32", "cpu")
    engine = BatchedEngine(loaded, model_name=MODEL, max_batch_size=concurrent, max_new_tokens=new_tokens)
    prompts = [engine.encode_chat([{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}])
               for i in range(concurrent)]

    def sequential() -> tuple[float, int]:
        started, produced = time.perf_counter(), 0
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([prompt])
                out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, do_sample=False,
                                            pad_token_id=loaded.tokenizer.pad_token_id)
                produced += out.shape[1] - ids.shape[1]
        return time.perf_counter() - started, produced

    async def batched() -> tuple[float, int]:
        await engine.start()
        try:
            started = time.perf_counter()
            streams = [engine.submit(GenerationRequest(prompt_ids=p, max_new_tokens=new_tokens, temperature=0.0))
                       for p in prompts]
            results = await asyncio.gather(*(s.collect() for s in streams))
            return time.perf_counter() - started, sum(r.completion_tokens for _, r in results)
        finally:
            await engine.stop()

    sequential()  # warm-up
    seq_time, seq_tokens = sequential()
    bat_time, bat_tokens = asyncio.run(batched())
    seq_rate, bat_rate = seq_tokens / seq_time, bat_tokens / bat_time
    print(f"\n2. Batched engine vs sequential generate: {concurrent} concurrent requests x {new_tokens} new tokens, "
          f"tiny model, CPU")
    print(f"   sequential generate: {seq_tokens} tokens in {seq_time:.2f} s = {seq_rate:.0f} tok/s")
    print(f"   batched engine:      {bat_tokens} tokens in {bat_time:.2f} s = {bat_rate:.0f} tok/s")
    print(f"   ratio: {bat_rate / seq_rate:.1f}x (target >= 5x)")


# -- 3. overhead of auth + limits + metrics + audit -----------------------------------------------------------


# what parts 3 and 4 ask for: a short completion, never cached
OVERHEAD_BODY = {"model": MODEL, "prompt": "overhead", "max_tokens": 4, "temperature": 1.0}


async def hammer(url: str, token: str | None, requests: int, concurrency: int) -> tuple[float, float]:
    """`requests` completions from `concurrency` clients at once: (wall seconds, this process's CPU seconds) per
    request, the client's set-up left out."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as client:
        async def worker(count: int) -> None:
            for _ in range(count):
                response = await client.post("/v1/completions", json=OVERHEAD_BODY)
                response.raise_for_status()

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        return (time.perf_counter() - started) / requests, (time.process_time() - cpu_started) / requests


async def raw_hammer(url: str, token: str | None, requests: int, concurrency: int) -> tuple[float, float]:
    """`hammer` with a lean client: one kept-alive connection per client, the request's bytes written once, and of each
    answer only the status line and `content-length` read (a few hundredths of a millisecond per request, against
    about half a millisecond for httpx), so that the server, not the client, is the slow side."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(OVERHEAD_BODY).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n" + (f"authorization: Bearer {token}\r\n" if token else "")
               + "\r\n").encode() + body

    async def worker(count: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for _ in range(count):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if head[9:12] != b"200":
                    raise RuntimeError(f"the server answered {head[:12].decode()!r}")
                length = head.index(b"content-length: ") + 16
                await reader.readexactly(int(head[length:head.index(b"\r\n", length)]))
        finally:
            writer.close()

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return (time.perf_counter() - started) / requests, (time.process_time() - cpu_started) / requests


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads: from the scheduler's nanosecond counters on Linux (the clock-tick
    counts of /proc/PID/stat make a 0.1 ms difference per request over 1000 requests only ten ticks)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    total = 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stats:
                total += int(stats.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    if total:
        return total / 1e9
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return pick(0.25), pick(0.5), pick(0.75)


def overhead(root: Path, quick: bool, before: str | None = None, concurrency: int = 10,
             client_kind: str = "httpx") -> None:
    """The API layer's cost on the no-op engine: all on vs all off. Short rounds alternate between the two (and
    `before`'s pair, the `server/` directory of another checkout, for a before/after table), and each "on" round is
    compared with the "off" round next to it: on a shared virtual machine the speed of the cores drifts by tens of
    percent within a minute, which a comparison of whole-run medians takes for a difference between the servers."""
    auth_dir, token = auth_setup(root)
    base = {"model_name": MODEL, "device": "cpu", "no_cache": True}
    full = {**base, "auth_dir": str(auth_dir), "audit_log": str(root / "overhead-audit.jsonl")}
    bare = {**base, "auth": "disabled"}
    requests, rounds, warm_up = (50, 2, 20) if quick else (150, 60, 300)
    sides = ["after", "before"] if before else ["after"]
    sources = {"after": None, "before": before}
    pin = _pinning()
    load = raw_hammer if client_kind == "raw" else hammer
    servers: dict[tuple[str, str], ServerProcess] = {}
    affinity = os.sched_getaffinity(0) if pin else None
    try:
        if pin:
            os.sched_setaffinity(0, {CLIENT_CPU})
        for side in sides:
            servers[side, "on"] = ServerProcess(full, "noop", record=True, source=sources[side], pin=pin).__enter__()
            servers[side, "off"] = ServerProcess(bare, "noop", record=False, source=sources[side],
                                                 pin=pin).__enter__()
        for (_side, mode), server in servers.items():
            asyncio.run(load(server.url, token if mode == "on" else None, warm_up, concurrency))
        wall: dict[tuple[str, str], list[float]] = {k: [] for k in servers}
        cpu: dict[tuple[str, str], list[float]] = {k: [] for k in servers}
        client: dict[tuple[str, str], list[float]] = {k: [] for k in servers}  # this process's CPU: the client's
        order = list(servers)
        for index in range(rounds):  # each round in reverse of the last
            for side, mode in order if index % 2 == 0 else order[::-1]:
                server = servers[side, mode]
                started = cpu_seconds(server.proc.pid)
                took, client_cpu = asyncio.run(load(server.url, token if mode == "on" else None, requests,
                                                    concurrency))
                cpu[side, mode].append((cpu_seconds(server.proc.pid) - started) / requests)
                wall[side, mode].append(took)
                client[side, mode].append(client_cpu)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        for server in servers.values():
            server.__exit__(None, None, None)
    print(f"\n3. Cost of auth + rate limits + metrics + audit, no-op engine, {concurrency} concurrent {client_kind} "
          f"client(s), {rounds} alternating rounds of {requests} requests"
          f"{', servers on CPU 1 and clients on CPU 0' if pin else ''} (limits in memory, audit to a file). "
          "+% columns: median (quartiles) of each on round against the off round beside it")
    print(f"   {'code':<7} {'on ms/req':>10} {'off ms/req':>11} {'on CPU ms':>10} {'off CPU ms':>11} "
          f"{'wall +%':>8} {'CPU +%':>7} {'CPU ms/req':>11}  {'CPU +% quartiles':>17}  {'client CPU ms on/off':>21} "
          f"{'client +%':>9}")
    for side in sides:
        t_on, t_off = statistics.median(wall[side, "on"]), statistics.median(wall[side, "off"])
        c_on, c_off = statistics.median(cpu[side, "on"]), statistics.median(cpu[side, "off"])
        k_on, k_off = statistics.median(client[side, "on"]), statistics.median(client[side, "off"])
        wall_q = quartiles([a / b - 1 for a, b in zip(wall[side, "on"], wall[side, "off"], strict=True)])
        cpu_q = quartiles([a / b - 1 for a, b in zip(cpu[side, "on"], cpu[side, "off"], strict=True) if b > 0]
                          or [float("nan")])
        client_q = quartiles([a / b - 1 for a, b in zip(client[side, "on"], client[side, "off"], strict=True)
                              if b > 0] or [float("nan")])
        print(f"   {side:<7} {1000 * t_on:>10.3f} {1000 * t_off:>11.3f} {1000 * c_on:>10.3f} {1000 * c_off:>11.3f} "
              f"{100 * wall_q[1]:>+8.1f} {100 * cpu_q[1]:>+7.1f} {1000 * (c_on - c_off):>+11.3f}  "
              f"{100 * cpu_q[0]:+6.1f} .. {100 * cpu_q[2]:+6.1f}  {1000 * k_on:>10.3f} / {1000 * k_off:<8.3f} "
              f"{100 * client_q[1]:>+9.1f}")
    print("   targets: <= 3 % wall and <= 10 % server CPU per request. The client (this process) also works more "
          "with everything on: it sends a token and, with httpx, reads four more response headers; where its CPU per "
          "request is as long as the wall time, the client, not the server, sets the pace, and the wall column "
          "measures it")


# -- 4. the same cost in instructions -------------------------------------------------------------------------


# callgrind runs the server about 50 times slower, so its timers are stretched as much: the audit writer's gathering
# of records into one write, and the auth directory's poll, do the same work per request as at full speed.
STRETCH = 50.0


def _run_server_stretched(settings_json: str, record: bool, port: int, source: str | None) -> None:
    if source is not None:
        sys.path.insert(0, source)
    import deepseek_server.audit as audit
    import deepseek_server.auth.directory_source as directory_source

    audit.BATCH_GATHER_S = getattr(audit, "BATCH_GATHER_S", 0.0) * STRETCH
    init = directory_source.DirectoryAuthSource.__init__
    if init.__defaults__:
        init.__defaults__ = tuple(value * STRETCH if isinstance(value, float) else value
                                  for value in init.__defaults__)
    _run_server(settings_json, "noop", record, port, source)


def count_instructions(settings: dict[str, Any], record: bool, source: str | None, token: str | None,
                       requests: int, out: Path, hash_seed: int = 0, concurrency: int = 1) -> int:
    """Instructions the server process (all its threads) ran while answering `requests` requests from `concurrency`
    clients at once, after 200 warm-up requests one at a time: callgrind starts counting when told to, after the
    warm-up, and stops before shutdown. `hash_seed` is the server's PYTHONHASHSEED (see `instructions`)."""
    port = free_port()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "from serve_load import _run_server_stretched; "
            f"_run_server_stretched({json.dumps(settings, default=str)!r}, {record}, {port}, {source!r})")
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                 f"--callgrind-out-file={out}", sys.executable, "-c", code],
                                stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "PYTHONHASHSEED": str(hash_seed)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server under valgrind exited with {proc.returncode}; see {out}.log")
            try:
                if httpx.get(f"{url}/ready", timeout=60).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server under valgrind did not become ready in 15 minutes")
            time.sleep(1)
        asyncio.run(hammer(url, token, 200, 1))
        # the warm-up's audit records are written before counting starts, as the measured ones are before it stops:
        # counted, a batch of them put the writer's cost of up to 200 more records on the measured requests
        time.sleep(0.05 * STRETCH + 1)
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(hammer(url, token, requests, concurrency))
        time.sleep(0.05 * STRETCH + 1)  # the audit writer gathers its last batch (50 ms, stretched) and writes it
        subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        proc.wait(600)
    totals = [line.split()[1] for line in out.read_text().splitlines() if line.startswith("totals:")]
    if not totals:
        raise RuntimeError(f"callgrind wrote no totals to {out}")
    return int(totals[0])


def instructions(root: Path, before: str | None, requests: int, seeds: int, concurrency: int = 1) -> None:
    """Part 4. Each server is counted `seeds` times, each start with another PYTHONHASHSEED, and the mean is reported:
    under valgrind a process's memory layout is the same from one start to the next, and it decides how many of
    CPython's type attribute cache entries collide (a few thousand instructions a request, moved by any change to the
    code that creates objects at import); another seed is another layout."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("\n4. Instructions per request: skipped, valgrind is not installed (apt-get install valgrind)")
        return
    auth_dir, token = auth_setup(root)
    base = {"model_name": MODEL, "device": "cpu", "no_cache": True}
    full = {**base, "auth_dir": str(auth_dir), "audit_log": str(root / "instructions-audit.jsonl")}
    bare = {**base, "auth": "disabled"}
    sides = {"after": None, **({"before": before} if before else {})}
    counts = {(side, mode, seed): count_instructions(full if mode == "on" else bare, mode == "on", source,
                                                     token if mode == "on" else None, requests,
                                                     root / f"callgrind.{side}.{mode}.{seed}", seed, concurrency)
                                  / requests
              for seed in range(1, seeds + 1) for side, source in sides.items() for mode in ("on", "off")}
    print(f"\n4. Instructions per request of the server process (callgrind, user space, all threads), no-op engine, "
          f"{requests} requests {'one at a time' if concurrency == 1 else f'from {concurrency} clients at once'} "
          f"after 200 warm-up, timers stretched {STRETCH:.0f}x as the server is "
          f"slowed; mean of {seeds} start(s) of each server with hash seeds 1..{seeds}")
    print(f"   {'code':<7} {'on':>12} {'off':>12} {'on +%':>7} {'on - off':>10}  {'on +% by seed':>14}")
    for side in sides:
        on = statistics.fmean(counts[side, "on", seed] for seed in range(1, seeds + 1))
        off = statistics.fmean(counts[side, "off", seed] for seed in range(1, seeds + 1))
        by_seed = " ".join(f"{100 * (counts[side, 'on', seed] / counts[side, 'off', seed] - 1):+.1f}"
                           for seed in range(1, seeds + 1))
        print(f"   {side:<7} {on:>12,.0f} {off:>12,.0f} {100 * (on / off - 1):>+7.1f} {on - off:>+10,.0f}  {by_seed}")
    print("   target: <= 10 % server CPU per request (instructions stand in for CPU time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each part small: checks the script runs")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "deepseek_v3"])
    parser.add_argument("--skip", default="", help="comma list of parts to skip: table,batching,overhead")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="the server/ directory of another checkout: part 3 measures it side by side")
    parser.add_argument("--overhead-concurrency", default="10", type=lambda text: [int(c) for c in text.split(",")],
                        help="part 3's concurrent clients, comma-separated (e.g. 1,10)")
    parser.add_argument("--overhead-client", default="httpx", choices=["httpx", "raw"],
                        help="part 3's client: httpx (as the openai client sends), or raw (a lean client that writes "
                             "prepared bytes: at 10 clients the server, not the client, is then the slow side)")
    parser.add_argument("--instructions", action="store_true",
                        help="part 4: instructions per request under valgrind's callgrind (about a minute per server "
                             "start, --instruction-seeds starts of each)")
    parser.add_argument("--instruction-requests", type=int, default=1000, help="part 4's requests per server")
    parser.add_argument("--instruction-concurrency", type=int, default=1,
                        help="part 4's concurrent clients (under valgrind the server is the slow side: at 10 it always "
                             "has requests waiting, as a busy server has)")
    parser.add_argument("--instruction-seeds", type=int, default=3,
                        help="part 4: starts of each server (hash seeds 1..N), whose counts are averaged")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from deepseek_server.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        model_dir = make_tiny_model(args.arch, root / "model")
        print(f"deepseek-server load benchmark: tiny {args.arch} (hidden 64, 2 layers), {os.cpu_count()} CPUs, "
              "no GPU")
        if "table" not in skip:
            latency_table(model_dir, root, args.quick)
        if "batching" not in skip:
            if args.quick:
                batched_vs_sequential(model_dir, concurrent=4, new_tokens=8)
            else:
                batched_vs_sequential(model_dir, concurrent=16, new_tokens=32)
        if "overhead" not in skip:
            for concurrency in args.overhead_concurrency:
                overhead(root, args.quick, args.before, concurrency, args.overhead_client)
        if args.instructions:
            instructions(root, args.before, args.instruction_requests, args.instruction_seeds,
                         args.instruction_concurrency)


if __name__ == "__main__":
    main()
