"""Benchmark: the builtin engine, vLLM direct, and vLLM through our gateway, side by side on one model.

One model (made by `deepseek-server make-tiny-model` with size flags: >= 100M parameters, head_dim 64 in full mode),
one client, streamed completions with temperature 0 and 64 output tokens, at concurrency 1, 16 and 64. All three
servers run at once and the order alternates between rounds, so drift on a shared machine hits all of them alike.
Prints tokens/s, p50/p95 latency and time to first token, with ratios next to the targets:
- builtin vs vLLM direct: >= 0.8x tokens/s at concurrency 16 (the rounds table);
- gateway vs vLLM direct: <= 3 % fewer tokens/s and <= 2 ms more p50 latency, at every concurrency (the paired
  table). A request on a CPU engine takes seconds and differs from the next by a few percent, far more than the
  gateway adds, so rounds minutes apart cannot resolve 2 ms. The paired part sends each request to vLLM direct and
  through the gateway at the same moment (N / 2 pairs in flight at concurrency N): the two share the engine's
  batches, and the difference between their latencies is what the gateway added. At concurrency 1 the two go one
  after the other (the engine has one request at a time), so there the pairs differ by the engine's drift too.
  Sent together, the gateway's request reaches the engine a little later and can miss the batch step its twin
  joined: a cost of the gateway that a CPU engine, with steps of tens to hundreds of milliseconds, magnifies.
  Even within one step the twin arrived first: vLLM hands a step's tokens to its streams one after another in the
  order their requests came (about 0.25 ms per stream here), so at 64 the gateway's request of a pair gets its last
  token milliseconds after its twin, however little the gateway itself takes. Both sides therefore reach vLLM through
  a tap (`bench/engine_tap.py`) that notes when each request reached the engine and when its answer left it: a
  request's latency minus that is the time spent outside the engine, and the gateway's side minus the direct side's
  is the time spent in the gateway ("in gw"). That is what the <= 2 ms target is judged on; the added latency per
  pair is shown beside it.
Also the CPU each server's process tree used per output token (the gateway row adds vLLM's) and the share of a core
it got while its round ran. On a shared machine the scheduler gives the servers different shares of the cores, which
moves tokens/s from run to run; CPU per token is what an engine change moves.

vLLM on this CPU-only machine keeps nearly two cores busy, so the gateway's own CPU (parsing, auth, relaying each
token) is taken from the engine and shows as engine time. In a pod the gateway container has CPU of its own and vLLM
computes on GPUs. `--pin` measures that arrangement: vLLM (and the builtin engine) on the last CPU, the gateway and
this client on the others; vLLM direct and through the gateway still share one vLLM. For the paired part the client
moves to the engines' CPU, at a higher priority than theirs where it may raise it, and leaves the gateway alone on the
others: the client's work per streamed chunk is about the gateway's, and on the gateway's CPU it would be queued in
front of it. Measured at concurrency 16 / 64, added p50 (httpx client): client beside the gateway +4.2 / +24.6 ms;
beside the engine +2.5 to +4.2 / +10.3 to +13.1 ms; beside the engine at nice -10 +0.65 / +17.7 ms. The paired part
reads with the gateway's own engine client (`--client raw`, the default): httpx's own work per chunk, at 64 streams
read one after another, made whichever request of a pair it read later look slower (`--client httpx` keeps it).

    .venv/bin/python bench/engines.py            # full: ~110M-parameter model
    .venv/bin/python bench/engines.py --quick    # tiny model, concurrency 1 and 2, 8 tokens: checks the script runs
    .venv/bin/python bench/engines.py --only vllm,gateway --concurrency 1,16
    .venv/bin/python bench/engines.py --only vllm,gateway --pin   # engines on one CPU, gateway + client on the rest
    .venv/bin/python bench/engines.py --only vllm,gateway --pin --parts paired   # the gateway's cost alone

vLLM comes from `make vllm-env` (.venv-vllm). Both our servers check real API keys (an auth directory made here).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from deepseek_server.engine.engine_http import EngineConnectionError, EngineHTTPClient, EngineTimeout

from devcluster.testing.polling import exit_on_sigterm
from devcluster.testing.ports import free_port

REPO = Path(__file__).resolve().parent.parent
STATUS_FILE = Path("/tmp/bench_engines_status.txt")
MODEL_NAME = "bench-model"
ISSUER, AUDIENCE = "deepseek-operator/bench/engines", "bench/engines"
TAP_REALTIME_PRIORITY = 10  # SCHED_FIFO, where permitted (CAP_SYS_NICE)
TARGETS = {"gateway_tokens_loss": 0.03, "gateway_p50_ms": 2.0, "builtin_ratio_c16": 0.8}
# full mode: 12 layers x (4 x 768^2 attention + 3 x 768 x 3072 MLP) ~ 113M parameters, head_dim 64
FULL_SIZE = ["--hidden-size", "768", "--layers", "12", "--heads", "12", "--kv-heads", "12",
             "--intermediate-size", "3072", "--max-len", "1024"]
ENGINES = ("builtin", "vllm", "gateway")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_auth(directory: Path) -> str:
    """An auth directory with one signing key and generous limits; returns a token valid for a day."""
    key = Ed25519PrivateKey.generate()
    x = b64url(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    directory.mkdir(parents=True, exist_ok=True)
    documents = {
        "config": {"issuer": ISSUER, "audience": AUDIENCE, "generation": 1,
                   "defaultLimits": {"rps": 100000, "burst": 100000, "tpm": None, "parallel": None}},
        "jwks": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "bench", "use": "sig", "alg": "EdDSA"}]},
        "revoked": {}, "limits": {},
    }
    for name, document in documents.items():
        (directory / f"{name}.json").write_text(json.dumps(document))
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "scope": ["model:predict"], "env": "dev",
              "uid": "bench", "jti": b64url(secrets.token_bytes(16)), "iat": now, "nbf": now, "exp": now + 86400}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "bench"})


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None
    log: Path
    token: str | None = None


def start(name: str, args: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None,
          token: str | None = None, cpus: set[int] | None = None) -> Server:
    """Start a server in its own session; with `cpus`, it and every process and thread it starts run only there."""
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    return Server(name, f"http://127.0.0.1:{port}", proc, log, token)


def start_tap(engine_url: str, ports: dict[str, int], log: Path, cpus: set[int] | None) -> Server:
    """`bench/engine_tap.py` in front of the engine at `engine_url`, a port per side; on `cpus` (the engines'), at a
    real-time priority where it may take one (else the client's), so it notes and relays each piece when it arrives.

    At an ordinary priority the tap shares the engines' CPU with vLLM's processes, and a request that comes while they
    compute waits for the CPU before the tap notes it: that wait counted as time outside the engine, and it fell on
    the gateway's requests, which come a little after their twins, when the engine is busiest with those (up to 14 ms
    for the first requests of a level at concurrency 64). The tap only relays bytes, so a real-time priority takes
    nothing measurable from the engine."""

    def place() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        with suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(TAP_REALTIME_PRIORITY))

    listen = [arg for side, port in ports.items() for arg in ("--listen", f"{side}={port}")]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("engine_tap.py")), "--upstream",
                                 engine_url.removeprefix("http://"), *listen], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=place)
    deadline = time.monotonic() + 30
    while b"ready" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the engine tap did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return Server("tap", engine_url, proc, log)


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(engines' CPUs, gateway's and client's CPUs) with `--pin`: the last CPU for the engines, the rest for the
    gateway and the client, as in a pod where the engine container and the gateway container each have their own
    CPU; (None, None) without it, or on a single CPU."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(allowed) < 2:
        return None, None
    return {allowed[-1]}, set(allowed[:-1])


def wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            sys.exit(f"{server.name} exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{server.name} not ready within {timeout:.0f} s:\n{server.log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@dataclass
class Level:
    """Results of one engine at one concurrency, over all rounds."""

    tokens: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_s: float | None = 0.0  # CPU seconds of the serving process trees (None: a server not started here)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_token(self) -> float | None:
        return self.cpu_s * 1000 / self.tokens if self.cpu_s is not None and self.tokens else None


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants, from /proc (all threads included)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        fields = stats.get(current)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        todo += children.get(current, [])
    return total / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int,
                      level: Level) -> tuple[float, int, float] | None:
    """Stream one completion into `level`; returns (latency s, completion tokens, time to first token s), or None if
    it failed."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {server.token}"} if server.token else {}
    started = time.perf_counter()
    first: float | None = None
    usage = None
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"{server.name}: HTTP {response.status_code}: {response.text[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, RuntimeError) as exc:
        return _failed(level, exc)
    return _completed(level, started, first, usage)


def _failed(level: Level, exc: BaseException) -> None:
    level.errors += 1
    if level.errors <= 3:
        print(f"  error: {exc}", file=sys.stderr)


def _completed(level: Level, started: float, first: float | None, usage: dict | None) -> tuple[float, int, float]:
    """Record a request that ended now into `level`: (latency s, completion tokens, time to first token s)."""
    done = time.perf_counter()
    tokens = int((usage or {}).get("completion_tokens") or 0)
    level.latencies.append(done - started)
    level.ttfts.append((first or done) - started)
    level.tokens += tokens
    return done - started, tokens, (first or done) - started


async def one_request_raw(clients: dict[str, EngineHTTPClient], server: Server, prompt: str, max_tokens: int,
                          level: Level) -> tuple[float, int, float] | None:
    """`one_request` through the gateway's own engine client (`clients`: one per server URL), for the paired part.

    httpx parses each streamed chunk through several layers in the client's own CPU time. At 64 streams an engine
    step ends them all at once and the client reads them one after another, so a request it happens to read late
    looks slower than its twin: in paired runs at 64 with httpx, a response ended 8.6 to 16 ms after its `[DONE]`
    line (the client's work in between). This client hands over what arrived in one read, and only the first token,
    the usage and the end of the body are looked for."""
    if server.url not in clients:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        clients[server.url] = EngineHTTPClient(host, int(port), connect_timeout=30, read_timeout=600,
                                               keepalive_expiry=600)
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    auth = b"authorization: Bearer %s\r\n" % server.token.encode() if server.token else b""
    started = time.perf_counter()
    first: float | None = None
    usage = None
    try:
        response = await clients[server.url].request("POST", "/v1/completions", body, headers=auth)
        try:
            if response.status_code != 200:
                raise RuntimeError(f"{server.name}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
            async for data in response.aiter_arrived():
                if first is None and b'"text":"' in data:
                    first = time.perf_counter()
                if b'"usage":{' in data:
                    for event in data.split(b"\n\n"):
                        if event.startswith(b"data: {") and b'"usage":{' in event:
                            usage = json.loads(event[6:])["usage"]
        finally:
            await response.aclose()
    except (EngineConnectionError, EngineTimeout, RuntimeError) as exc:
        return _failed(level, exc)
    return _completed(level, started, first, usage)


async def run_level(server: Server, concurrency: int, requests: int, max_tokens: int, level: Level,
                    round_no: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                await one_request(client, server, f"Request {round_no}-{i}: tell me a story about", max_tokens,
                                  level)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.seconds += time.perf_counter() - started


@dataclass
class Paired:
    """vLLM direct and through the gateway at one concurrency, the same request sent to both (a pair)."""

    direct: Level = field(default_factory=Level)
    gateway: Level = field(default_factory=Level)
    pairs: list[tuple[tuple[float, int, float], tuple[float, int, float]]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # each pair's prompt, as the engine tap logs it
    # per pair, the engine's time for each side (direct, gateway) as the tap in front of it saw it; None: not seen
    engine_s: list[tuple[float, float] | None] = field(default_factory=list)

    def stream_tokens_per_s(self, side: int) -> float:
        """Tokens per second of one stream, over the pairs where both requests completed."""
        seconds = sum(pair[side][0] for pair in self.pairs)
        return sum(pair[side][1] for pair in self.pairs) / seconds if seconds else 0.0

    def added_ms(self, what: int = 0) -> list[float]:
        """Gateway minus direct per pair, in ms: latency (0) or time to first token (2)."""
        return [(gateway[what] - direct[what]) * 1000 for direct, gateway in self.pairs]

    def in_gateway_ms(self) -> list[float]:
        """Per pair, in ms: the time the gateway's request spent outside the engine (client latency minus the
        engine's time, as the tap saw it) minus the same for the direct request. Unlike `added_ms`, this leaves out
        where the engine put each request in its batch: vLLM hands a batch step's tokens to its streams one after
        another in the order the requests came, and the gateway's request of a pair, sent together with its twin,
        reaches the engine after it."""
        return [((gateway[0] - engine[1]) - (direct[0] - engine[0])) * 1000
                for (direct, gateway), engine in zip(self.pairs, self.engine_s, strict=True) if engine is not None]

    def note_engine_times(self, tap: dict[tuple[str, str, str], float], since: int) -> None:
        """Fill `engine_s` for the pairs from index `since` on from the tap's log (`read_tap`). The direct client
        reads to the end of vLLM's body; the gateway ends its client's response at vLLM's `[DONE]`."""
        for prompt in self.prompts[since:]:
            try:
                self.engine_s.append((tap["end", "direct", prompt] - tap["req", "direct", prompt],
                                      tap["done", "gateway", prompt] - tap["req", "gateway", prompt]))
            except KeyError:
                self.engine_s.append(None)


def read_tap(log: Path, offset: int = 0) -> dict[tuple[str, str, str], float]:
    """(kind, side, prompt) -> time, from `bench/engine_tap.py`'s log from byte `offset` on; a later line for the same
    key wins."""
    times: dict[tuple[str, str, str], float] = {}
    with open(log, "rb") as lines:
        lines.seek(offset)
        text = lines.read().decode()
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            times[parts[0], parts[1], parts[2]] = float(parts[3])
    return times


async def run_paired(direct: Server, gateway: Server, concurrency: int, pairs: int, max_tokens: int,
                     result: Paired, round_no: int, client_kind: str = "raw", tap_log: Path | None = None) -> None:
    """At concurrency 1, pairs one after the other, the two requests of a pair in turn (which side goes first
    alternates), so the engine serves one request at a time. At N >= 2, N / 2 pairs in flight, the two requests of a
    pair sent together: the engine has N requests in flight and a pair's two share its batches, so what differs
    between them is the gateway, not the engine's pace, which drifts by a few percent from one request to the next."""
    limits = httpx.Limits(max_connections=2 * concurrency, max_keepalive_connections=2 * concurrency)
    raw: dict[str, EngineHTTPClient] = {}
    since = len(result.prompts)
    tap_offset = tap_log.stat().st_size if tap_log is not None else 0  # a round's prompts repeat in the next level's
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        queue = list(range(pairs))

        def request(server: Server, prompt: str, level: Level) -> Any:
            if client_kind == "raw":
                return one_request_raw(raw, server, prompt, max_tokens, level)
            return one_request(client, server, prompt, max_tokens, level)

        async def worker() -> None:
            while queue:
                i = queue.pop()
                prompt = f"Pair {round_no}-{i}: tell me a story about"
                if concurrency == 1:
                    sides = [(direct, result.direct), (gateway, result.gateway)]
                    samples = {}
                    for server, level in (sides[::-1] if i % 2 else sides):
                        samples[server.name] = await request(server, prompt, level)
                    first, second = samples[direct.name], samples[gateway.name]
                else:
                    first, second = await asyncio.gather(request(direct, prompt, result.direct),
                                                         request(gateway, prompt, result.gateway))
                if first is not None and second is not None:
                    result.pairs.append((first, second))
                    result.prompts.append(prompt)

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, concurrency // 2))))
        finally:
            for engine_client in raw.values():
                engine_client.close()
    if tap_log is not None:
        # the tap logs a piece right after handing it on: give its last lines a moment to be written
        deadline = time.monotonic() + 2
        while True:
            tap = read_tap(tap_log, tap_offset)
            if time.monotonic() > deadline or all(
                    ("end", "direct", prompt) in tap and ("done", "gateway", prompt) in tap
                    for prompt in result.prompts[since:]):
                break
            await asyncio.sleep(0.05)
        result.note_engine_times(tap, since)


def _resolved(values: list[float], target: float) -> tuple[str, float, float]:
    """(verdict, mean, 95 % interval of the mean) for per-pair ms against `target`: met only when the pairs resolve
    it, the median within the target and the mean's interval too."""
    if not values:
        return "NOT MEASURED", float("nan"), float("nan")
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else float("nan")
    interval = 1.96 * spread / len(values) ** 0.5
    if pct(values, 0.5) <= target and mean + interval <= target:
        return "ok", mean, interval
    if pct(values, 0.5) > target and mean - interval > target:
        return "MISS", mean, interval
    return f"UNRESOLVED (+-{interval:.0f} ms)", mean, interval


def paired_table(results: dict[int, Paired], judge: bool = True) -> str:
    """Per concurrency: each side's tokens/s per stream and p50 latency, what the gateway added per pair, and the
    time spent in the gateway (judged when the engine tap measured it)."""
    lines = [f"{'conc':>4} {'pairs':>5} {'err':>4} {'tok/s/stream direct':>19} {'gateway':>8} {'ratio':>6} "
             f"{'p50 direct':>10} {'gateway':>9} {'added p50':>9} {'mean':>7} {'95% CI':>8} {'TTFT':>6} "
             f"{'in gw p50':>9} {'mean':>6} {'95% CI':>6}  (target)"]
    verdicts: list[bool] = []
    target = TARGETS["gateway_p50_ms"]
    for concurrency, paired in results.items():
        direct, gateway = paired.stream_tokens_per_s(0), paired.stream_tokens_per_s(1)
        ratio = gateway / direct if direct else 0.0
        added, in_gateway = paired.added_ms(), paired.in_gateway_ms()
        added_verdict, mean, interval = _resolved(added, target)
        in_verdict, in_mean, in_interval = _resolved(in_gateway, target)
        ok_tokens = ratio >= 1 - TARGETS["gateway_tokens_loss"]
        tapped = bool(in_gateway)
        verdicts += [ok_tokens, (in_verdict if tapped else added_verdict) == "ok"]
        judged = (f"in gateway p50 <= {target:.0f} ms {in_verdict} ({len(in_gateway)} pairs timed at the engine); "
                  f"added p50 {added_verdict}" if tapped else f"added p50 <= {target:.0f} ms {added_verdict}")
        note = (f"tok/s >= {1 - TARGETS['gateway_tokens_loss']:.2f}x {('ok' if ok_tokens else 'MISS')}; {judged}"
                if judge else "(not judged)")
        lines.append(f"{concurrency:>4} {len(paired.pairs):>5} {paired.direct.errors + paired.gateway.errors:>4} "
                     f"{direct:>19.2f} {gateway:>8.2f} {ratio:>6.3f} {pct(paired.direct.latencies, 0.5) * 1000:>10.1f} "
                     f"{pct(paired.gateway.latencies, 0.5) * 1000:>9.1f} "
                     f"{pct(added, 0.5):>+9.2f} {mean:>+7.1f} {interval:>8.1f} {pct(paired.added_ms(2), 0.5):>+6.1f} "
                     f"{pct(in_gateway, 0.5) if tapped else float('nan'):>+9.2f} {in_mean:>+6.2f} {in_interval:>6.2f}  "
                     f"{note}")
    lines.append(f"gateway targets met: {sum(verdicts)}/{len(verdicts)}" if judge else "targets not judged (--quick)")
    return "\n".join(lines)


def table(results: dict[int, dict[str, Level]], engines: list[str], judge: bool = True) -> str:
    """Rows per concurrency and engine, with ratios to vLLM direct; `judge=False` (a quick run) leaves out verdicts."""
    lines = [f"{'conc':>4} {'engine':<8} {'tok/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'TTFT p50':>9} {'err':>4} "
             f"{'CPU ms/tok':>10} {'core':>5}  vs vLLM direct (target)"]
    verdicts: list[bool] = []

    def mark(ok: bool) -> str:
        return ("ok" if ok else "MISS") if judge else "(not judged)"

    for concurrency, by_engine in results.items():
        direct = by_engine.get("vllm")
        for name in engines:
            level = by_engine[name]
            p50 = pct(level.latencies, 0.5) * 1000
            note = ""
            if direct is not None and name != "vllm" and direct.tokens_per_s:
                ratio = level.tokens_per_s / direct.tokens_per_s
                if name == "gateway":
                    # judged on the paired table: rounds minutes apart differ by more than the gateway costs
                    overhead = p50 - pct(direct.latencies, 0.5) * 1000
                    note = f"tok/s {ratio:.3f}x; p50 {overhead:+.1f} ms (judged paired, below)"
                else:
                    note = f"tok/s {ratio:.3f}x"
                    if concurrency == 16:
                        ok = ratio >= TARGETS["builtin_ratio_c16"]
                        verdicts.append(ok)
                        note += f" (>= {TARGETS['builtin_ratio_c16']}) {mark(ok)}"
            cpu = level.cpu_ms_per_token
            if cpu is not None and direct is not None and direct.cpu_ms_per_token and name == "builtin":
                note += f"; vLLM's CPU per token / ours {direct.cpu_ms_per_token / cpu:.3f}x"
            cpu_cells = (f"{cpu:>10.2f} {level.cpu_s / level.seconds:>5.2f}" if cpu is not None and level.seconds
                         else f"{'-':>10} {'-':>5}")
            lines.append(f"{concurrency:>4} {name:<8} {level.tokens_per_s:>8.1f} {p50:>9.1f} "
                         f"{pct(level.latencies, 0.95) * 1000:>9.1f} {pct(level.ttfts, 0.5) * 1000:>9.1f} "
                         f"{level.errors:>4} {cpu_cells}  {note}")
    if not judge:
        lines.append("targets not judged (--quick)")
    elif verdicts:
        lines.append(f"builtin target met: {sum(verdicts)}/{len(verdicts)}")
    else:
        lines.append("no target judged here (the builtin engine's is at concurrency 16; the gateway's, paired)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, concurrency 1,2, 8 tokens, one round, targets not judged")
    parser.add_argument("--model", type=Path, help="use this model directory instead of making one")
    parser.add_argument("--concurrency", help="levels (default 1,16,64; 1,2 with --quick)")
    parser.add_argument("--requests", type=int, help="requests per engine, level and round (default: by mode)")
    parser.add_argument("--rounds", type=int, help="rounds per level; the order alternates (default 2; 1 quick)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 64; 8 with --quick)")
    parser.add_argument("--only", default=",".join(ENGINES), help="engines to run: builtin,vllm,gateway")
    parser.add_argument("--parts", default="rounds,paired",
                        help="rounds: each engine in turn, alternating; paired: vLLM direct and through the gateway "
                             "sent the same requests at once (needs the gateway)")
    parser.add_argument("--vllm-venv", type=Path, default=Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm")))
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="the paired part's client: raw (the gateway's own engine client: what arrived in "
                             "one read, little parsing; default) or httpx (what the rounds use; at 64 streams its "
                             "own reading adds milliseconds to whichever request of a pair it reads second)")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--vllm-url", help="use a running vLLM serving the model as bench-model (with --model)")
    parser.add_argument("--pin", action="store_true",
                        help="run vLLM and the builtin engine on the last CPU, the gateway and this client on the "
                             "others: the gateway's cost without the CPU it would take from the engine")
    parser.add_argument("--vllm-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="start vLLM with --enforce-eager -O0: no torch.compile, a start in about a third of the "
                             "time, slower decoding (default: on with --quick only)")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or ("1,2" if args.quick else "1,16,64")
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (8 if args.quick else 64)
    args.vllm_eager = args.quick if args.vllm_eager is None else args.vllm_eager
    parts = set(args.parts.split(","))
    if not parts or parts - {"rounds", "paired"}:
        parser.error(f"--parts takes rounds, paired or both, not {args.parts!r}")
    if parts == {"paired"} and "gateway" not in args.only.split(","):
        parser.error("--parts paired compares vLLM direct with the gateway: add gateway to --only")
    args.parts = parts
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()  # a terminated run still stops the servers it started
    engines = [e for e in ENGINES if e in args.only.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    STATUS_FILE.write_text(f"running since {time.strftime('%H:%M:%S')}: cd {REPO} && {sys.executable} "
                           f"{shlex.join(sys.argv)}\n")
    vllm_python = args.vllm_venv / "bin" / "python"
    if ("vllm" in engines or "gateway" in engines) and not vllm_python.exists():
        sys.exit(f"no vLLM environment at {args.vllm_venv}: run `make vllm-env`")
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    model = args.model
    if model is None:
        model = work / "model"
        size = [] if args.quick else FULL_SIZE
        subprocess.run([sys.executable, "-m", "deepseek_server", "make-tiny-model", "--arch", "llama", *size,
                        str(model)], check=True)
    config = json.loads((model / "config.json").read_text())
    max_len = int(config.get("max_position_embeddings", 512))
    token = make_auth(work / "auth")
    server_cmd = [sys.executable, "-m", "deepseek_server", "serve", "--model-name", MODEL_NAME, "--auth-dir",
                  str(work / "auth"), "--no-cache", "--host", "127.0.0.1", "--audit-log", str(work / "audit.jsonl"),
                  "--max-new-tokens", str(args.max_tokens), "--log-level", "warning"]
    engine_cpus, front_cpus = split_cpus(args.pin)
    if front_cpus:
        os.sched_setaffinity(0, front_cpus)  # the client
    ports = {name: free_port() for name in ENGINES}
    servers: dict[str, Server] = {}
    print(f"model {model} ({config.get('hidden_size')} hidden, {config.get('num_hidden_layers')} layers); "
          f"logs in {work}", flush=True)
    with ExitStack() as stack:
        if args.vllm_url:
            servers["vllm"] = Server("vllm", args.vllm_url.rstrip("/"), None, work / "vllm.log")
        elif "vllm" in engines or "gateway" in engines:
            servers["vllm"] = start("vllm", [
                str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(ports["vllm"]),
                "--dtype", "float32", "--max-model-len", str(max_len), "--max-num-seqs", str(max(levels)),
                "--disable-log-stats", "--uvicorn-log-level", "warning",
                *(["--enforce-eager", "-O0"] if args.vllm_eager else [])],
                ports["vllm"], work, env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
                                          "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}, cpus=engine_cpus)
            stack.callback(stop, servers["vllm"])
        tap_log: Path | None = None
        tap_priority = "an ordinary priority (a real-time one needs CAP_SYS_NICE)"
        paired_vllm = servers.get("vllm")
        if "gateway" in engines:
            engine_url = servers["vllm"].url
            if "paired" in args.parts:
                # In the paired part both sides reach vLLM through the tap, so each request's time in the engine is
                # known on both sides and the path outside it costs them the same (see bench/engine_tap.py). The
                # rounds keep vLLM direct (the builtin engine's target is judged against it); the gateway's rounds,
                # not judged, then pass the tap too.
                tap_log = work / "tap.log"
                tap_ports = {"direct": free_port(), "gateway": free_port()}
                tap = start_tap(engine_url, tap_ports, tap_log, engine_cpus)
                stack.callback(stop, tap)
                assert tap.proc is not None
                with suppress(OSError):
                    if os.sched_getscheduler(tap.proc.pid) == os.SCHED_FIFO:
                        tap_priority = "a real-time priority (SCHED_FIFO)"
                paired_vllm = dataclasses.replace(servers["vllm"], url=f"http://127.0.0.1:{tap_ports['direct']}")
                engine_url = f"http://127.0.0.1:{tap_ports['gateway']}"
            servers["gateway"] = start("gateway", [*server_cmd, "--engine", "vllm", "--engine-url",
                                                   engine_url, "--port", str(ports["gateway"])],
                                       ports["gateway"], work, token=token, cpus=front_cpus)
            stack.callback(stop, servers["gateway"])
        if "builtin" in engines:
            # a thread on each CPU it may use, as the operator configures a replica whose resources.cpu is that
            # many (vLLM uses them all too)
            threads = len(engine_cpus) if engine_cpus else len(os.sched_getaffinity(0))
            servers["builtin"] = start("builtin", [*server_cmd, "--engine", "builtin", "--model", str(model),
                                                   "--precision", "fp32", "--device", "cpu", "--max-batch-size",
                                                   str(max(levels)), "--torch-threads", str(threads),
                                                   "--port", str(ports["builtin"])],
                                       ports["builtin"], work, token=token, cpus=engine_cpus)
            stack.callback(stop, servers["builtin"])
        for name in servers:
            wait_ready(servers[name], "/health" if name == "vllm" else "/ready", 900)
        print("all servers ready; warming up", flush=True)
        for name in engines:
            asyncio.run(run_level(servers[name], 1 if args.quick else 2, 1 if args.quick else 4, args.max_tokens,
                                  Level(), -1))
        results: dict[int, dict[str, Level]] = {}
        for concurrency in levels if "rounds" in args.parts else []:
            requests = args.requests or (2 * concurrency if args.quick else max(16, 2 * concurrency))
            results[concurrency] = {name: Level() for name in engines}
            for round_no in range(args.rounds):
                order = engines if round_no % 2 == 0 else engines[::-1]
                for name in order:
                    level = results[concurrency][name]
                    # the gateway's work includes the vLLM behind it
                    trees = [servers[n].proc for n in ({name, "vllm"} if name == "gateway" else {name})]
                    measured = all(proc is not None for proc in trees)
                    cpu_before = sum(tree_cpu_seconds(proc.pid) for proc in trees if proc is not None)
                    asyncio.run(run_level(servers[name], concurrency, requests, args.max_tokens, level, round_no))
                    cpu_used = sum(tree_cpu_seconds(proc.pid) for proc in trees if proc is not None) - cpu_before
                    level.cpu_s = level.cpu_s + cpu_used if measured and level.cpu_s is not None else None
                    print(f"  c={concurrency} round {round_no} {name}: {level.tokens_per_s:.1f} tok/s so far, "
                          f"p50 {pct(level.latencies, 0.5) * 1000:.1f} ms", flush=True)
        paired: dict[int, Paired] = {}
        client_priority = "default priority"
        if "gateway" in engines and "paired" in args.parts:
            print("vLLM direct and through the gateway, paired", flush=True)
            if engine_cpus:
                # The gateway keeps its CPU to itself, as its container does in a pod. The client moves to the
                # engine's CPU: its own work per streamed chunk, about the gateway's here, would otherwise queue in
                # front of the gateway's; beside the engine, it slows both requests of a pair alike. At a higher
                # priority than the engine's, it reads each chunk when it arrives instead of after the engine's
                # time slice, which would add milliseconds to whichever request's last chunk came second.
                os.sched_setaffinity(0, engine_cpus)
                try:
                    os.setpriority(os.PRIO_PROCESS, 0, -10)
                    client_priority = "nice -10"
                except OSError:
                    client_priority = "default priority (raising it needs CAP_SYS_NICE)"
            for concurrency in levels:
                pairs = args.requests or (concurrency if args.quick else max(16, concurrency))
                paired[concurrency] = Paired()
                for round_no in range(args.rounds):
                    asyncio.run(run_paired(paired_vllm, servers["gateway"], concurrency, pairs,
                                           args.max_tokens, paired[concurrency], round_no, args.client, tap_log))
                    print(f"  c={concurrency} round {round_no}: {len(paired[concurrency].pairs)} pairs, added p50 "
                          f"{pct(paired[concurrency].added_ms(), 0.5):+.2f} ms, in the gateway p50 "
                          f"{pct(paired[concurrency].in_gateway_ms(), 0.5):+.2f} ms", flush=True)
    report = table(results, engines, judge=not args.quick) if results else ""
    if paired:
        report += ("\n\n" if report else "") + (
            "vLLM direct and through the gateway, paired: the same request to both, in turns at concurrency 1, "
            "sent together at N (N / 2 pairs in flight)"
            + (f"; the client on the engines' CPU {sorted(engine_cpus)} at {client_priority}, the gateway alone on "
               f"{sorted(front_cpus)}" if engine_cpus and front_cpus else "")
            + ";\nadded = gateway latency - direct latency per pair, its mean shown with a 95 % interval; TTFT: the "
              "median added time to first token;\nin gw = per pair, (gateway latency - the engine's time for it) - "
              f"(direct latency - the engine's time for it), the engine's times taken by the tap in front of vLLM (at "
              f"{tap_priority}): its median is judged, the mean's interval must resolve it\n"
            + paired_table(paired, judge=not args.quick))
    print()
    print(f"engines bench ({'quick' if args.quick else 'full'}): {args.max_tokens} output tokens, temperature 0, "
          f"streamed, {args.rounds} rounds alternating, model hidden {config.get('hidden_size')} x "
          f"{config.get('num_hidden_layers')} layers" + ("; vLLM eager (no torch.compile)" if args.vllm_eager else "")
          + (f"; engines pinned to CPU {sorted(engine_cpus)}, gateway and client to {sorted(front_cpus)}"
             if engine_cpus and front_cpus else ""))
    print(report)
    STATUS_FILE.write_text(STATUS_FILE.read_text() + f"finished {time.strftime('%H:%M:%S')}:\n{report}\n")
    if not args.keep_logs:
        for path in work.glob("*.log"):
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
