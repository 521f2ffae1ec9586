"""One audit record per API request whatever its outcome (200, 400, 401, 403, 404, 413, 429, 500, 503), and a
model that is still loading answered with 503 and `Retry-After`."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deepseek_server.app import create_app

from devcluster.testing.model_server import LIMITED_UID, ServerThread, tiny_settings

MODEL = "deepseek-tiny"


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audit_by_request_id(path: Path, request_ids: list[str], timeout: float = 30) -> dict[str, list[dict[str, Any]]]:
    """The records of `request_ids`, waiting until every one has at least one (they are written as responses end)."""
    deadline = time.monotonic() + timeout
    while True:
        by_id: dict[str, list[dict[str, Any]]] = {}
        for record in read_audit(path):
            by_id.setdefault(str(record["request_id"]), []).append(record)
        if all(rid in by_id for rid in request_ids) or time.monotonic() > deadline:
            return by_id
        time.sleep(0.1)


def completion(url: str, token: str | None, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "prompt": "audit", "max_tokens": 2, "temperature": 0, **body}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def nan_model(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with NaN final-norm weights: it loads and warms up, and every sampled request fails."""
    import torch
    from safetensors.torch import load_file, save_file

    target = tmp_path_factory.mktemp("nan-model") / "tiny-nan"
    shutil.copytree(tiny_models["llama"], target)
    weights = load_file(target / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def nan_server(nan_model: Path, auth_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    """A server on `nan_model` and its audit log."""
    audit = tmp_path_factory.mktemp("audit-nan") / "audit.jsonl"
    server = ServerThread(create_app(tiny_settings(nan_model, auth_dir=auth_dir, audit_log=audit))).start()
    yield server, audit
    server.stop()


def test_every_outcome_gets_exactly_one_audit_record(llama_server: ServerThread, audit_path: Path,
                                                     nan_server: tuple[ServerThread, Path],
                                                     token_factory: Callable[..., str]) -> None:
    token = token_factory(uid="uid-every-status", sub="audit-every-status")
    no_predict = token_factory(uid="uid-history-only", scope=["history:read"])
    limited = token_factory(uid=LIMITED_UID)
    sent: list[tuple[httpx.Response, int, str]] = []  # (response, expected status, expected error code)

    def check(response: httpx.Response, status: int, code: str | None = None) -> None:
        assert response.status_code == status, response.text
        if code is not None:
            assert response.json()["error"]["code"] == code, response.text
        sent.append((response, status, code or ""))

    url = llama_server.url
    check(completion(url, token), 200)
    check(completion(url, token, max_tokens=-1), 400)
    check(completion(url, token, max_tokens="many"), 400)  # a schema validation error is a 400 too, never a 422
    check(completion(url, None), 401, "missing_api_key")
    check(completion(url, no_predict), 403)
    check(completion(url, token, model="no-such-model"), 404, "model_not_found")
    max_body = int(llama_server.app.state.services.settings.max_body_bytes)
    check(completion(url, token, prompt="x" * (max_body + 1)), 413)
    for _ in range(10):  # rps 0.5, burst 3 (shared with other tests of this session): 429 within a few calls
        response = completion(url, limited)
        if response.status_code == 429:
            break
        assert response.status_code == 200, response.text
        sent.append((response, 200, ""))
    check(response, 429, "rate_limit_exceeded")
    assert int(response.headers["retry-after"]) >= 1

    main_ids = [r.headers["x-request-id"] for r, _, _ in sent]
    by_id = audit_by_request_id(audit_path, main_ids)
    for response, status, code in sent:
        rid = response.headers["x-request-id"]
        records = by_id.get(rid, [])
        assert len(records) == 1, f"{status}: {len(records)} audit record(s) for {rid}"
        assert records[0]["status"] == status and records[0]["path"] == "/v1/completions"
        if code:
            assert records[0]["error_code"] == code

    # 500: the model fails while generating (NaN logits when sampling); greedy still answers
    failing, nan_audit = nan_server
    ok = completion(failing.url, token)
    failed = completion(failing.url, token, temperature=1.0)
    assert ok.status_code == 200, ok.text
    assert failed.status_code == 500, failed.text
    by_id = audit_by_request_id(nan_audit, [ok.headers["x-request-id"], failed.headers["x-request-id"]])
    for response in (ok, failed):
        records = by_id.get(response.headers["x-request-id"], [])
        assert [r["status"] for r in records] == [response.status_code]
    assert by_id[failed.headers["x-request-id"]][0]["key_uid"] == "uid-every-status"
    for path in (audit_path, nan_audit):
        text = path.read_text()
        for secret in (token, no_predict, limited):
            assert secret.split(".")[2] not in text, "a token's signature reached the audit log"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_leaves_while_sending_its_body_is_recorded_as_gone_not_as_a_server_error(
        path: str, llama_server: ServerThread, audit_path: Path, token_factory: Callable[..., str]) -> None:
    """A client that closes the connection before its body is all sent gets the record of any client that left
    before its answer (499 `client_disconnected`): its audit record said 500 with no error code, and it was counted in
    `deepseek_api_errors_total{status="500"}` (route `unmatched`), both saying the server failed."""
    def count(status: str) -> float:
        text = httpx.get(f"{llama_server.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("deepseek_api_errors_total{") and f'status="{status}"' in line)

    before = len(read_audit(audit_path))
    errors_500 = count("500")
    host, port = llama_server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"authorization: Bearer {token_factory()}\r\ncontent-length: 1000\r\n\r\n".encode()
                     + b'{"model": "deepseek-tiny", "prompt": "hel')
        time.sleep(0.3)  # the server has the head and part of the body, and waits for the rest
    deadline = time.monotonic() + 30
    while len(read_audit(audit_path)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    records = read_audit(audit_path)[before:]
    assert [(r["path"], r["status"], r["error_code"]) for r in records] == [(path, 499, "client_disconnected")]
    assert count("500") == errors_500


@pytest.fixture
def gated_loading(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The real loader, held at its start until the returned event is set: the model stays 'loading' meanwhile."""
    from deepseek_server.engine import loading

    release = threading.Event()
    load_model = loading.load_model

    def load_when_released(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(120), "the test never released the model load"
        return load_model(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", load_when_released)
    return release


def test_a_model_still_loading_answers_503_with_retry_after_then_serves(
        tiny_models: dict[str, Path], auth_dir: Path, tmp_path: Path, gated_loading: threading.Event,
        token_factory: Callable[..., str]) -> None:
    audit = tmp_path / "audit.jsonl"
    server = ServerThread(create_app(tiny_settings(tiny_models["llama"], auth_dir=auth_dir, audit_log=audit)))
    server.thread.start()
    try:
        def alive() -> bool:
            try:
                return httpx.get(f"{server.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        deadline = time.monotonic() + 60
        while not alive():
            assert time.monotonic() < deadline, "the server did not answer /health"
            time.sleep(0.1)
        token = token_factory(uid="uid-loading")
        assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 503
        loading = completion(server.url, token)
        assert loading.status_code == 503, loading.text
        assert int(loading.headers["retry-after"]) >= 1
        error = loading.json()["error"]
        assert error["code"] == "model_not_ready" and error["type"] == "server_error"
        records = audit_by_request_id(audit, [loading.headers["x-request-id"]]).get(
            loading.headers["x-request-id"], [])
        assert [r["status"] for r in records] == [503]

        gated_loading.set()
        deadline = time.monotonic() + 120
        while httpx.get(f"{server.url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the model did not load once released"
            time.sleep(0.1)
        served = completion(server.url, token)
        assert served.status_code == 200, served.text
    finally:
        gated_loading.set()
        server.stop()
