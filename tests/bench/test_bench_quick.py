"""Every script under bench/ in its quick mode, as a user runs it: it starts, measures a little, prints its table and
exits 0. No timing is judged here (benchmarks print ratios; thresholds belong to a person reading them); what is
checked is that the script still runs end to end and that what it measured is complete (no failed requests, every
key Ready)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# pytest's own limit above each script's (`run_bench`'s 600 s and its 120 s to stop after SIGTERM): reached first,
# it would stop the test without the SIGTERM that makes a script stop the devcluster and servers it started
pytestmark = pytest.mark.timeout(900)


def run_bench(script: str, *args: str, timeout: float = 600) -> str:
    """`python bench/<script> ARGS` from the repository root; returns its stdout, failing with its output's tail.

    Past `timeout` the script gets SIGTERM, on which it stops the devcluster, operator and servers it started (they
    run in sessions of their own: a SIGKILL would leave them running), and the failure shows what it printed."""
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"bench/{script} {' '.join(args)} did not finish in {timeout:.0f} s:\n"
                    f"{(stdout + stderr)[-4000:]}")
    output = stdout + stderr
    assert proc.returncode == 0, f"bench/{script} {' '.join(args)} exited {proc.returncode}:\n{output[-4000:]}"
    return stdout


def test_gpu_check_quick_prints_throughput_and_8bit_tables() -> None:
    out = run_bench("gpu_check.py", "--quick")
    assert "concurrency  engine tok/s" in out, out
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.MULTILINE)
    assert rows == ["1", "4"], out
    assert re.search(r"^\s+fp32\s+[\d.]+", out, re.MULTILINE) and re.search(r"^\s+int8\s+[\d.]+", out, re.MULTILINE)
    assert "torch.ao.nn.quantized.dynamic" in out, "the 8-bit model's linear layers are not quantized"
    assert "largest batch 14 rows" in out and "features: all ok" in out, out


# What a GPU machine with torch, transformers and accelerate need not have: the HTTP server's packages.
GATEWAY_ONLY = ("fastapi", "starlette", "uvicorn", "redis", "orjson", "jwt", "pydantic_settings", "cryptography")
WITHOUT_GATEWAY = f"""
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {GATEWAY_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")
sys.meta_path.insert(0, Absent())
sys.argv = ["bench/gpu_check.py", "--quick", "--skip-int8"]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_runs_without_the_http_servers_packages() -> None:
    proc = subprocess.run([sys.executable, "-c", WITHOUT_GATEWAY], cwd=REPO, text=True, capture_output=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", proc.stdout, re.MULTILINE) == ["1", "4"], out


def test_serve_load_quick_prints_its_three_parts() -> None:
    out = run_bench("serve_load.py", "--quick")
    table = out[out.index("1. Latency table"):out.index("2. Batched engine")]
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s", table, re.MULTILINE)
    assert [(conc, reqs) for conc, reqs, _ in rows] == [("2", "2"), ("4", "4")], table
    assert all(float(errors) == 0 for _, _, errors in rows), table
    assert re.search(r"batched engine: +\d+ tokens", out) and re.search(r"ratio: [\d.]+x", out), out
    assert "3. Cost of auth + rate limits + metrics + audit" in out
    assert re.search(r"^\s+after\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[+-][\d.]+", out, re.MULTILINE), out


def test_serve_load_quick_overhead_with_the_lean_client() -> None:
    out = run_bench("serve_load.py", "--quick", "--skip", "table,batching", "--overhead-client", "raw")
    assert "concurrent raw client(s)" in out, out
    row = re.search(r"^\s+after(\s+[+-]?[\d.]+){8}\s+\.\.\s+[+-][\d.]+\s+([\d.]+) / ([\d.]+)\s+[+-][\d.]+$", out,
                    re.MULTILINE)
    assert row, out
    assert float(row.group(2)) > 0 and float(row.group(3)) > 0, out  # the client's CPU per request, on and off


@pytest.mark.cluster
@pytest.mark.slow
def test_apikeys_quick_makes_every_key_ready() -> None:
    out = run_bench("apikeys.py", "--quick")
    assert "p50 apply->Ready" in out and "operator peak RSS" in out, out
    assert "MISSED" not in out and "(not judged)" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["keys"] == 20 and result["ready"] == 20, result
    assert result["auth_limits_entries"] == 2  # one key in ten has its own limits


@pytest.mark.cluster
@pytest.mark.slow
def test_apikeys_at_rest_quick_reverifies_every_key_after_a_restart() -> None:
    out = run_bench("apikeys_at_rest.py", "--quick")
    assert "API requests/s at rest (all)" in out and "restart: all keys re-verified (s)" in out, out
    assert "MISSED" not in out and "(not judged)" in out
    [result] = json.loads(out.strip().splitlines()[-1])
    assert result["keys"] == 20 and result["ready"] == 20, result
    assert result["restart_apikey_reconciles"] >= 20 and result["restart_verified_s"] is not None, result
    assert result["restart_secret_configmap_writes"] == 0 and result["restart_status_writes"] == 0, result
    # A signing-key rotation published while new keys arrive: each new key gets a token, the 20 keys that hold one
    # are not reconciled for it.
    assert result["rotation_published"] and result["rotation_new_keys_with_token"] == 50, result
    assert result["rotation_reconciles"].get("ApiKey", 0) < 20, result


@pytest.mark.cluster
@pytest.mark.slow
def test_rollout_quick_switches_once_without_failed_requests() -> None:
    out = run_bench("rollout.py", "--quick")
    assert re.search(r"^rollout 1: switched after [\d.]+s", out, re.MULTILINE), out
    assert "1 rollouts, polling interval 1s" in out
    served = re.search(r"client requests during rollouts : (\d+) ok, (\d+) failed", out)
    assert served and int(served[1]) > 0 and served[2] == "0", out


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_autoscale_quick_follows_the_ramp_without_failed_requests() -> None:
    out = run_bench("autoscale.py", "--quick", timeout=1200)
    assert re.search(r"^ramp 1 -> 8 streams: decided 2 replicas after [\d.]+s, 2 ready after [\d.]+s", out,
                     re.MULTILINE), out
    assert re.search(r"^ramp 8 -> 1 streams: decided 1 replica after [\d.]+s", out, re.MULTILINE), out
    assert re.search(r"time to scale up   : [\d.]+s", out) and re.search(r"time to scale down : [\d.]+s", out), out
    served = re.search(r"requests +: (\d+) ok, (\d+) failed", out)
    assert served and int(served[1]) > 0 and served[2] == "0", out


@pytest.mark.slow
def test_engines_quick_compares_three_engines_at_two_levels() -> None:
    out = run_bench("engines.py", "--quick", "--pin")
    if len(os.sched_getaffinity(0)) >= 2:  # engines on one CPU, the gateway and the client on the others
        assert re.search(r"; engines pinned to CPU \[\d+\], gateway and client to \[[\d, ]+\]$", out, re.MULTILINE), out
    rows = re.findall(r"^\s+(\d+) (builtin|vllm|gateway)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+)", out,
                      re.MULTILINE)
    assert [(conc, engine) for conc, engine, _, _ in rows] == [
        (c, e) for c in ("1", "2") for e in ("builtin", "vllm", "gateway")], out
    assert all(float(tokens_s) > 0 and errors == "0" for _, _, tokens_s, errors in rows), out
    assert "targets not judged (--quick)" in out
    # the paired part: at each level, pairs where both requests completed, what the gateway added per pair, and the
    # time spent in the gateway (every pair timed at the engine by the tap in front of it: a number, not nan)
    paired = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+"
                        r"([+-][\d.]+)\s+([+-][\d.]+)\s+\S+\s+[+-][\d.]+\s+([+-][\d.]+)\s+([+-][\d.]+)\s+\S+\s+"
                        r"\(not judged\)$", out, re.MULTILINE)
    assert [row[0] for row in paired] == ["1", "2"], out
    assert all(int(pairs) > 0 and errors == "0" and float(direct) > 0 and float(gateway) > 0
               for _, pairs, errors, direct, gateway, *_ in paired), out


def test_gateway_overhead_quick_measures_every_side() -> None:
    out = run_bench("gateway_overhead.py", "--quick")
    rows = re.findall(r"^\s+(\d+)\s+(direct|gateway)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+)", out, re.MULTILINE)
    assert [(conc, side) for conc, side, _ in rows] == [("1", "direct"), ("1", "gateway"), ("16", "direct"),
                                                       ("16", "gateway")], out
    assert all(errors == "0" for _, _, errors in rows), out
    assert re.search(r"^\s+16 gateway .* [\d.]+ +[\d.]+ +[+-][\d.]+ ms$", out, re.MULTILINE), out


def test_auth_size_quick_loads_every_entry_and_sees_each_revocation() -> None:
    out = run_bench("auth_size.py", "--quick")
    for label in ("largest ConfigMap", "load all documents (--auth-dir)", "verify, cache miss, p50",
                  "revocation reaches the server"):
        assert re.search(rf"^\s+{re.escape(label)}.*\s(ok|MISSED)$", out, re.MULTILINE), out
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["keys"], result["revoked"], result["objects"]) == (10_000, 5_000, 17), result
    assert result["revocation_objects"] == 1 and result["largest_kib"] < 900, result
    assert result["before_keys_under_budget"] < result["before_keys_under_cap"], result


def test_server_memory_quick_samples_both_servers_through_the_requests_and_the_idle_wait() -> None:
    out = run_bench("server_memory.py", "--quick", "--before", str(REPO / "server"))
    rows = re.findall(r"^\s+(\d+|idle 2 s)\s+(\d+)\s+(\d+)\s+[\d.]+$", out, re.MULTILINE)
    assert [label for label, _, _ in rows] == ["0", "14", "28", "idle 2 s"], out
    assert all(int(before) > 100 and int(after) > 100 for _, before, after in rows), out  # a loaded model's RSS
    assert "before: answered 28 x 200" in out and "after: answered 28 x 200" in out, out
