"""Rate limits, audit records and live revocation against the live tiny-Llama server."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devcluster.testing import polling
from devcluster.testing.model_server import (
    BURST_UID,
    SLOW_REFILL_UID,
    TOKENS_UID,
    ServerThread,
    write_json_atomically,
)

MODEL = "deepseek-tiny"


def post_completion(server: ServerThread, token: str, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "prompt": "limits", "max_tokens": 1, **body}
    return httpx.post(f"{server.url}/v1/completions", json=payload, headers={"authorization": f"Bearer {token}"},
                      timeout=30)


RATE = 0.5  # requests per second of BURST_UID (burst 3)


def send_until_refused(send: Callable[[], httpx.Response | int], most: int = 12) -> tuple[list[int], float]:
    """Send until a 429 (at most `most` requests); returns the statuses and the seconds it took."""
    started = time.monotonic()
    statuses: list[int] = []
    while len(statuses) < most:
        result = send()
        statuses.append(result if isinstance(result, int) else result.status_code)
        if statuses[-1] == 429:
            break
    return statuses, time.monotonic() - started


def test_burst_beyond_the_limit_gets_429_with_headers(llama_server: ServerThread,
                                                      token_factory: Callable[..., str]) -> None:
    token = token_factory(uid=BURST_UID)  # rps 0.5, burst 3; no other test uses this key
    responses: list[httpx.Response] = []

    def send() -> httpx.Response:
        responses.append(post_completion(llama_server, token))
        return responses[-1]

    statuses, took = send_until_refused(send)
    assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429, statuses
    # a slow machine may let the clock refill a request or two, never more than 0.5 per second
    assert len(statuses) - 1 <= 3 + int(RATE * took), f"{statuses} in {took:.1f}s"
    ok, limited = responses[0], responses[-1]
    assert ok.headers["x-ratelimit-limit-requests"] == "3"
    assert ok.headers["x-ratelimit-remaining-requests"] == "2"
    assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    assert limited.headers.get_list("x-ratelimit-remaining-requests") == ["0"]  # once: the refusal's own
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    metrics = httpx.get(f"{llama_server.url}/metrics").text
    assert 'deepseek_ratelimit_rejections_total{limit="requests"}' in metrics

    # the openai client sees the refusal as its own RateLimitError
    client = openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=token, max_retries=0)

    def through_client(api: openai.OpenAI) -> int:
        try:
            api.completions.create(model=MODEL, prompt="again", max_tokens=1)
        except openai.RateLimitError:
            return 429
        return 200

    statuses, took = send_until_refused(lambda: through_client(client))
    assert statuses[-1] == 429 and statuses.count(200) <= 1 + int(RATE * took), f"{statuses} in {took:.1f}s"
    # a rotated token of the same ApiKey (same uid, new jti) shares the counters: a fresh bucket would pass 3
    rotated = openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=token_factory(uid=BURST_UID), max_retries=0)
    statuses, took = send_until_refused(lambda: through_client(rotated))
    assert statuses[-1] == 429 and statuses.count(200) <= 1 + int(RATE * took), f"{statuses} in {took:.1f}s"


def test_tokens_per_minute(llama_server: ServerThread, token_factory: Callable[..., str]) -> None:
    token = token_factory(uid=TOKENS_UID)  # tpm 40
    used = 0
    for _ in range(6):
        response = post_completion(llama_server, token, max_tokens=30, temperature=1.0)  # not cached
        if response.status_code == 429:
            break
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-tokens"] == "40"
        used += response.json()["usage"]["total_tokens"]
    else:
        pytest.fail("the tokens-per-minute limit never applied")
    assert used >= 40 - 30
    assert response.json()["error"]["type"] == "tokens"
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(response.headers["retry-after"]) >= 1


def read_audit(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_audit_has_one_record_per_request_and_no_token(llama_server: ServerThread, audit_path: Path,
                                                       token_factory: Callable[..., str]) -> None:
    token = token_factory(uid="uid-audit", sub="audited-user")
    auth = {"authorization": f"Bearer {token}"}
    secret_prompt = "SECRET-PROMPT-CONTENT-4242"
    calls = [
        ("POST", "/v1/completions", {"model": MODEL, "prompt": secret_prompt, "max_tokens": 3}, auth, 200),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": secret_prompt}],
                                          "max_tokens": 3, "stream": True}, auth, 200),
        ("POST", "/v1/completions", {"model": "other", "prompt": secret_prompt}, auth, 404),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": secret_prompt, "max_tokens": -1}, auth, 400),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": secret_prompt}, {}, 401),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": secret_prompt},
         {"authorization": f"Bearer {token}x"}, 401),
        ("GET", "/v1/models", None, auth, 200),
    ]
    request_ids = []
    for method, path, body, headers, status in calls:
        response = httpx.request(method, f"{llama_server.url}{path}", json=body, headers=headers, timeout=30)
        assert response.status_code == status, response.text
        request_ids.append((response.headers["x-request-id"], status, path))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = read_audit(audit_path)
        by_id: dict[object, list[dict[str, object]]] = {}
        for record in records:
            by_id.setdefault(record["request_id"], []).append(record)
        if all(rid in by_id for rid, _, _ in request_ids):
            break
        time.sleep(0.05)
    for rid, status, path in request_ids:
        assert len(by_id[rid]) == 1, f"{rid} has {len(by_id.get(rid, []))} audit records"
        record = by_id[rid][0]
        assert record["status"] == status and record["path"] == path
        for field in ("time", "key_uid", "subject", "token_id", "route", "model", "prompt_tokens",
                      "completion_tokens", "latency_ms", "fingerprint"):
            assert field in record
    first = by_id[request_ids[0][0]][0]
    assert first["key_uid"] == "uid-audit" and first["subject"] == "audited-user"
    assert first["prompt_tokens"] and first["completion_tokens"] == 3 and first["fingerprint"]
    assert by_id[request_ids[1][0]][0]["stream"] is True
    assert by_id[request_ids[4][0]][0]["error_code"] == "missing_api_key"
    text = audit_path.read_text()
    assert token not in text
    assert token.split(".")[2] not in text  # not even the signature
    assert secret_prompt not in text


def test_revoking_in_the_auth_dir_applies_without_a_restart(llama_server: ServerThread, auth_dir: Path,
                                                            token_factory: Callable[..., str]) -> None:
    jti = "revoke-me-live-000000a"
    token = token_factory(jti=jti, uid="uid-revoke")
    headers = {"authorization": f"Bearer {token}"}
    assert httpx.get(f"{llama_server.url}/v1/models", headers=headers).status_code == 200
    revoked = json.loads((auth_dir / "revoked.json").read_text())
    revoked[jti] = int(time.time()) + 3600
    started = time.monotonic()
    write_json_atomically(auth_dir / "revoked.json", revoked)
    response = wait_for_response(lambda: httpx.get(f"{llama_server.url}/v1/models", headers=headers), 401)
    print(f"revocation applied {time.monotonic() - started:.2f}s after the file changed")
    assert response.json()["error"]["message"] == "Incorrect API key provided: The API key has been revoked."
    # other keys are unaffected
    assert httpx.get(f"{llama_server.url}/v1/models",
                     headers={"authorization": f"Bearer {token_factory()}"}).status_code == 200


def wait_for_response(send: Callable[[], httpx.Response], status: int, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = send()
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, f"still {response.status_code} after {timeout}s: {response.text}"
            return response
        time.sleep(0.05)


def auth_reloads(server: ServerThread) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return next(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == "deepseek_auth_reloads_total")


def test_a_broken_auth_update_keeps_the_last_good_state(llama_server: ServerThread, auth_dir: Path,
                                                        token_factory: Callable[..., str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    limits_file = auth_dir / "limits.json"
    good = json.loads(limits_file.read_text())
    # a key that refills one request per 100 s: the broken file's rejection can take seconds to be noticed on a busy
    # machine, and the check below must still find the key refused by its own limits
    assert good[SLOW_REFILL_UID]["burst"] == 3
    limited = token_factory(uid=SLOW_REFILL_UID)
    statuses, _ = send_until_refused(lambda: post_completion(llama_server, limited))
    assert statuses[-1] == 429, statuses
    reloads = auth_reloads(llama_server)
    caplog.set_level(logging.ERROR, logger="deepseek_server")
    try:
        limits_file.write_text("{not json")
        polling.wait_for("the server to reject the broken limits.json", lambda: [
            r for r in caplog.records if "keeping the previous auth state" in r.getMessage()
            and str(auth_dir) in r.getMessage()], timeout=60, interval=0.05)
        assert auth_reloads(llama_server) == reloads, "a broken auth directory was applied"
        # the key's own limits (burst 3) still hold; the defaults (1000/s) would let it through
        assert post_completion(llama_server, limited).status_code == 429
        assert httpx.get(f"{llama_server.url}/v1/models",
                         headers={"authorization": f"Bearer {token_factory()}"}).status_code == 200
    finally:
        write_json_atomically(limits_file, good)
    polling.wait_for("the repaired auth directory to be applied", lambda: auth_reloads(llama_server) == reloads + 1,
                     timeout=60, interval=0.05)
    assert auth_reloads(llama_server) == reloads + 1


def test_requests_before_the_auth_state_loads_get_503_with_retry_after(tmp_path: Path) -> None:
    """A server whose auth ConfigMap has not arrived yet refuses API requests as every other 503 it answers: OpenAI's
    error shape and a Retry-After."""
    from deepseek_server.app import create_app
    from deepseek_server.engine.noop import NoopEngine

    from devcluster.testing.model_server import tiny_settings

    (tmp_path / "auth").mkdir()  # mounted, still empty
    server = ServerThread(create_app(tiny_settings(tmp_path / "unused", auth_dir=tmp_path / "auth",
                                                   model_name="noop"), engine=NoopEngine()))
    server.thread.start()
    try:
        ready = polling.wait_for("the server to answer", lambda: _get(f"{server.url}/ready"))
        assert ready.status_code == 503 and ready.json()["auth"] is False
        headers = {"authorization": "Bearer not-checked-yet"}
        for response in (httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30,
                                    json={"model": "noop", "prompt": "x"}),
                         httpx.get(f"{server.url}/v1/history", headers=headers, timeout=30)):
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "auth_not_loaded"
            assert response.headers["retry-after"] == "1"
    finally:
        server.stop()


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
