"""The cheap forms of what each request records say exactly what the general-purpose forms said: the audit
timestamp, the audit JSON line, the request metrics as Prometheus exposes them, and the auth directory's change
check."""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from deepseek_server.audit import encode_record
from deepseek_server.auth.dependency import authorization_header
from deepseek_server.auth.directory_source import DirectoryAuthSource
from deepseek_server.auth.documents import AuthState
from deepseek_server.metrics import ERRORS_HELP, LATENCY_BUCKETS, REQUESTS_HELP, RequestStats
from deepseek_server.redaction import Redactor
from deepseek_server.request_recording import audit_record, utc_timestamp
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.datastructures import Headers

from devcluster.testing.model_server import SigningKey, write_auth_dir


def test_timestamp_is_what_datetime_isoformat_writes() -> None:
    rng = random.Random(7)
    # millisecond and microsecond boundaries, where rounding and truncation differ, and random instants
    instants = [0.0, 1.0, -1.5, -0.0004, -86_400.0009995,  # before the epoch too
                1_700_000_000.0, 1_700_000_000.9995, 1_700_000_000.0009995, 1_700_000_059.9999996,
                2_157_813_716.292, 3_298_349_361.6919994]
    instants += [round(rng.uniform(0, 4e9), rng.choice([3, 4, 6, 7])) for _ in range(20_000)]
    for now in instants:
        assert utc_timestamp(now) == datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"), now


def test_audit_latency_is_milliseconds_to_two_decimals() -> None:
    """What `round(elapsed * 1000, 2)` gives, without its decimal string round trip."""
    rng = random.Random(11)
    scope = {"method": "POST", "path": "/v1/completions", "client": ("10.0.0.1", 4000)}
    redactor = Redactor.from_setting("email")
    latencies = [0.0, 0.000004, 0.000005, 0.0012345, 0.1, 1.0, 59.999999, 120.0]
    latencies += [rng.uniform(0, 1) * rng.choice([1e-4, 1e-2, 1.0, 300.0]) for _ in range(20_000)]
    for elapsed in latencies:
        record = audit_record(scope, {}, "req-1", "/v1/completions", 200, elapsed, redactor, 1_700_000_000.0)
        assert record["latency_ms"] == round(elapsed * 1000, 2), elapsed


def test_audit_line_is_the_standard_librarys_compact_json() -> None:
    record = {"time": "2026-11-30T14:03:30.123+00:00", "request_id": "req-0123", "key_uid": "uid-1",
              "subject": "Zoë — café", "token_id": None, "status": 429, "latency_ms": 1234.57, "stream": False,
              "cache": None, "prompt_preview": "quote \" backslash \\ tab \t newline \n ünïcode ✓ 😀"}
    line = encode_record(record)
    assert line == json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    assert b"\n" not in line  # one record, one line


def test_audit_line_keeps_integers_beyond_64_bits() -> None:
    record = {"prompt_tokens": 2**70, "status": 200}
    assert json.loads(encode_record(record)) == record


def test_request_stats_expose_what_prometheus_client_counters_and_histograms_did() -> None:
    observations = [("/v1/completions", 200, 0.0012), ("/v1/completions", 200, 0.3), ("/v1/completions", 429, 0.004),
                    ("/v1/completions", 200, 0.005), ("/health", 200, 0.0), ("unmatched", 404, 200.0),
                    ("/v1/chat/completions", 503, 1.0), ("/v1/chat/completions", 200, 0.025),
                    ("/v1/completions", 500, 0.2), ("/health", 503, 0.001)]  # new statuses of routes seen before
    reference = CollectorRegistry()
    requests = Counter("deepseek_api_requests", REQUESTS_HELP, ["route", "status"], registry=reference)
    errors = Counter("deepseek_api_errors", ERRORS_HELP, ["route", "status"], registry=reference)
    latency = Histogram("deepseek_api_request_duration_seconds", "Time to the last byte of a response", ["route"],
                        buckets=LATENCY_BUCKETS, registry=reference)
    cheap = CollectorRegistry()
    stats = RequestStats(LATENCY_BUCKETS)
    cheap.register(stats)
    assert generate_latest(cheap) == generate_latest(reference)  # nothing observed yet: the same empty families
    for route, status, elapsed in observations:
        requests.labels(route, str(status)).inc()
        if status >= 400:
            errors.labels(route, str(status)).inc()
        latency.labels(route).observe(elapsed)
        stats.observe(route, status, elapsed)
    assert generate_latest(cheap).decode() == generate_latest(reference).decode()


@pytest.mark.parametrize("elapsed", [0.005, 0.0050001, 120.0, 120.5])
def test_a_latency_on_a_bucket_bound_counts_in_that_bucket(elapsed: float) -> None:
    registry = CollectorRegistry()
    stats = RequestStats(LATENCY_BUCKETS)
    registry.register(stats)
    stats.observe("/v1/completions", 200, elapsed)
    for bound in (*LATENCY_BUCKETS, float("inf")):
        le = "+Inf" if bound == float("inf") else str(float(bound))
        expected = 1.0 if elapsed <= bound else 0.0
        assert registry.get_sample_value("deepseek_api_request_duration_seconds_bucket",
                                         {"route": "/v1/completions", "le": le}) == expected, le


def test_auth_directory_change_through_kubelets_symlinks_is_seen(tmp_path: Path) -> None:
    """A mounted Secret/ConfigMap: each file is a symlink through `..data`, which kubelet swaps in one rename."""
    key = SigningKey(kid="k1")
    mount = tmp_path / "mount"
    write_auth_dir(tmp_path / "v1", [key])
    write_auth_dir(tmp_path / "v2", [key], revoked={"jti-gone": 4_000_000_000})
    mount.mkdir()
    for version in ("v1", "v2"):
        (tmp_path / version).rename(mount / f"..{version}")
    (mount / "..data").symlink_to("..v1")
    for name in os.listdir(mount / "..v1"):
        (mount / name).symlink_to(Path("..data") / name)
    states: list[AuthState] = []
    source = DirectoryAuthSource(mount, states.append)
    assert source.load_once() and not states[-1].revoked
    assert not source.load_once()  # nothing changed: nothing re-read
    (mount / "..data.tmp").symlink_to("..v2")
    (mount / "..data.tmp").rename(mount / "..data")
    assert source.load_once()
    assert "jti-gone" in states[-1].revoked


@pytest.mark.parametrize("headers", [
    [],
    [(b"host", b"a"), (b"content-type", b"application/json")],
    [(b"host", b"a"), (b"authorization", b"Bearer abc.def.ghi")],
    [(b"authorization", b"Bearer first"), (b"authorization", b"Bearer second")],  # the first, as Starlette reads it
    [(b"authorization", b"")],
    [(b"authorization", "Bearer caf\u00e9".encode("latin-1"))],  # bytes above 127: latin-1, as Starlette decodes
    [(b"x-authorization", b"Bearer not-this"), (b"authorizations", b"nor-this")],
])
def test_authorization_header_is_what_starlettes_headers_read(headers: list[tuple[bytes, bytes]]) -> None:
    assert authorization_header(headers) == Headers(raw=headers).get("authorization")
