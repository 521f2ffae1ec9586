"""Rate limits, audit records and live revocation against the live tiny-Llama server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import LIMITED_UID, TOKENS_UID, ServerThread, write_json_atomically

MODEL = "deepseek-tiny"


def post_completion(server: ServerThread, token: str, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "prompt": "limits", "max_tokens": 1, **body}
    return httpx.post(f"{server.url}/v1/completions", json=payload, headers={"authorization": f"Bearer {token}"},
                      timeout=30)


def test_burst_beyond_the_limit_gets_429_with_headers(llama_server: ServerThread,
                                                      token_factory: Callable[..., str]) -> None:
    token = token_factory(uid=LIMITED_UID)  # rps 0.5, burst 3
    responses = [post_completion(llama_server, token) for _ in range(6)]
    statuses = [r.status_code for r in responses]
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429, 429]
    ok, limited = responses[0], responses[3]
    assert ok.headers["x-ratelimit-limit-requests"] == "3"
    assert ok.headers["x-ratelimit-remaining-requests"] == "2"
    assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    client = openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="again", max_tokens=1)
    # a rotated token of the same ApiKey (same uid, new jti) shares the counters
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key=token_factory(uid=LIMITED_UID),
                      max_retries=0).completions.create(model=MODEL, prompt="rotated", max_tokens=1)
    metrics = httpx.get(f"{llama_server.url}/metrics").text
    assert 'deepseek_ratelimit_rejections_total{limit="requests"}' in metrics


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
    deadline = time.monotonic() + 5
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


def test_revoking_in_the_auth_dir_applies_within_two_seconds(llama_server: ServerThread, auth_dir: Path,
                                                             token_factory: Callable[..., str]) -> None:
    jti = "revoke-me-live-000000a"
    token = token_factory(jti=jti, uid="uid-revoke")
    headers = {"authorization": f"Bearer {token}"}
    assert httpx.get(f"{llama_server.url}/v1/models", headers=headers).status_code == 200
    revoked = json.loads((auth_dir / "revoked.json").read_text())
    revoked[jti] = int(time.time()) + 3600
    started = time.monotonic()
    write_json_atomically(auth_dir / "revoked.json", revoked)
    while time.monotonic() - started < 2.0:
        response = httpx.get(f"{llama_server.url}/v1/models", headers=headers)
        if response.status_code == 401:
            break
        time.sleep(0.05)
    assert response.status_code == 401, "revocation did not apply within 2 s"
    assert "revoked" in response.json()["error"]["message"]
    # other keys are unaffected
    assert httpx.get(f"{llama_server.url}/v1/models",
                     headers={"authorization": f"Bearer {token_factory()}"}).status_code == 200


def test_a_broken_auth_update_keeps_the_last_good_state(llama_server: ServerThread, auth_dir: Path,
                                                        token_factory: Callable[..., str]) -> None:
    limits_file = auth_dir / "limits.json"
    good = limits_file.read_text()
    try:
        limits_file.write_text("{not json")
        time.sleep(0.6)
        response = httpx.get(f"{llama_server.url}/v1/models",
                             headers={"authorization": f"Bearer {token_factory()}"})
        assert response.status_code == 200
    finally:
        write_json_atomically(limits_file, json.loads(good))
        time.sleep(0.6)
