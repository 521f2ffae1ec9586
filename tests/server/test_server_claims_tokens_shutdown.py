"""Two claims of server/README.md, end to end over HTTP against a real server: "Cache hits cost no tokens" (a key's
tokens-per-minute budget is charged for a completion the engine generated, never for an answer from the response
cache), and "503 ... shutting down ... with `Retry-After`" (a generation request that reaches a server whose shutdown
has begun is answered with OpenAI's error shape, code `shutting_down`)."""

from __future__ import annotations

import http.client
import json
import math
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deepseek_server.app import create_app

from devcluster.testing.model_server import (
    ServerThread,
    SigningKey,
    mint,
    server_process,
    tiny_settings,
    write_auth_dir,
)

MODEL = "deepseek-tiny"
TPM = 120  # two tokens a second flow back into the budget: small next to what one completion costs
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=["memory", "redis"])
def tpm_server(request: pytest.FixtureRequest, tiny_models: dict[str, Path], signing_key: SigningKey,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    """A server with the response cache on (the default) and a key limited to TPM tokens a minute, its limits kept
    in this process's memory or in a real Redis; yields the server and the key's uid (one per backend, as Redis
    keeps its counters for the session)."""
    uid = f"uid-cache-tokens-{request.param}"
    auth = write_auth_dir(tmp_path_factory.mktemp("auth-tpm"), [signing_key],
                          limits={uid: {"rps": 100, "burst": 100, "tpm": TPM, "parallel": None}})
    redis = {"redis_url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    settings = tiny_settings(tiny_models["llama"], auth_dir=auth, **redis)
    assert settings.cache_enabled
    server = ServerThread(create_app(settings)).start()
    yield server, uid
    server.stop()


def test_a_cache_hit_costs_no_tokens_while_a_miss_is_charged_what_it_used(tpm_server: tuple[ServerThread, str],
                                                                         signing_key: SigningKey) -> None:
    """Each answer's `x-ratelimit-remaining-tokens` says what the key has left once that request was admitted: a
    miss has its prompt plus `max_tokens` reserved by then, a hit (admitted with nothing reserved) shows the budget as
    it stands. Repeated hits must leave it where it was (it only refills meanwhile), while a miss takes what it used
    (its usage), less what flowed back while it ran."""
    server, uid = tpm_server
    token = mint(signing_key, uid=uid)

    def complete(prompt: str) -> tuple[httpx.Response, int, float]:
        """The answer, the key's remaining tokens it reports, and when it came (monotonic seconds)."""
        response = httpx.post(f"{server.url}/v1/completions", headers={"authorization": f"Bearer {token}"},
                              json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-tokens"] == str(TPM)
        return response, int(response.headers["x-ratelimit-remaining-tokens"]), time.monotonic()

    def refilled(since: float, until: float) -> int:
        """The most tokens that can have flowed back into the budget between two moments (and one for rounding)."""
        return math.ceil((until - since) * TPM / 60) + 1

    started = time.monotonic()
    miss, at_miss, _ = complete("cache hits cost no tokens")
    assert miss.headers["x-cache"] == "miss"
    usage = miss.json()["usage"]
    # admitted with its prompt and max_tokens reserved out of a full budget
    assert at_miss <= TPM - (usage["prompt_tokens"] + MAX_TOKENS) + refilled(started, time.monotonic())

    hits = [complete("cache hits cost no tokens") for _ in range(5)]
    assert [h.headers["x-cache"] for h, _, _ in hits] == ["hit"] * 5
    assert all(h.json()["usage"] == usage for h, _, _ in hits)  # a hit reports the usage of the answer it repeats
    remaining = [left for _, left, _ in hits]
    # the miss was settled at what it used (its unused reservation refunded) before the first hit was admitted
    assert remaining[0] <= TPM - usage["total_tokens"] + refilled(started, hits[0][2])
    # hits cost nothing: the budget never goes down from one hit to the next (it can only refill)
    assert remaining == sorted(remaining), f"remaining tokens fell across cache hits: {remaining}"

    # and the limit is really charged for a miss: a new prompt takes its usage out of what the hits saw
    before, at_before = remaining[-1], hits[-1][2]
    other, _, _ = complete("a prompt not cached yet")
    assert other.headers["x-cache"] == "miss"
    used = other.json()["usage"]["total_tokens"]
    assert used > 0
    probe, after, at_after = complete("cache hits cost no tokens")  # a hit: reads the budget, costs nothing
    assert probe.headers["x-cache"] == "hit"
    assert before - after >= used - refilled(at_before, at_after), (
        f"a miss that used {used} tokens took only {before - after} from the budget ({before} -> {after})")


def _post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any],
          token: str) -> tuple[int, dict[str, str], bytes]:
    conn.request("POST", path, body=json.dumps(body),
                 headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_a_request_arriving_once_shutdown_has_begun_gets_503_shutting_down_with_retry_after(
        tiny_models: dict[str, Path], signing_key: SigningKey, tmp_path: Path) -> None:
    """The state is reached as in production: `deepseek-server serve` (a subprocess) gets SIGTERM while one request
    is still being received (its client has sent half its body), so the drain runs to the end of
    `--shutdown-grace-s`; shortly before that end the server marks itself shutting down (`services.shutting_down`,
    set by `end_running_requests`, which logs "shutdown grace nearly over"). New connections are refused by then,
    so the request comes on a keep-alive connection the client opened before the signal (`--drain-idle-s` keeps it
    open), as a busy client's next request does. It must be refused as the README says: 503, OpenAI's error shape,
    code `shutting_down`, `Retry-After`."""
    auth = write_auth_dir(tmp_path / "auth", [signing_key])
    token = mint(signing_key, uid="uid-shutting-down")
    args = ["--model", str(tiny_models["llama"]), "--model-name", MODEL, "--precision", "fp32", "--device", "cpu",
            "--max-model-len", "256", "--max-new-tokens", "16", "--auth-dir", str(auth),
            "--shutdown-grace-s", "3", "--drain-idle-s", "30"]
    body = {"model": MODEL, "prompt": "are you stopping", "max_tokens": 2, "temperature": 0}
    with server_process(args, log_dir=tmp_path) as (url, proc):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        kept = http.client.HTTPConnection(host, int(port), timeout=30)
        status, headers, _ = _post(kept, "/v1/completions", body, token)  # served, and the connection kept open
        assert status == 200 and headers.get("connection") != "close"
        with socket.create_connection((host, int(port)), timeout=30) as half_sent:
            half_sent.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                              f"authorization: Bearer {token}\r\ncontent-length: 1000\r\n\r\n".encode()
                              + b'{"model": "deepseek-tiny", "prompt": "hel')
            time.sleep(0.3)  # the server has the head and is waiting for the rest of the body
            proc.send_signal(signal.SIGTERM)
            log = tmp_path / "server-0.log"
            deadline = time.monotonic() + 30
            while "shutdown grace nearly over" not in log.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.02)
            status, headers, raw = _post(kept, "/v1/completions", body, token)
        kept.close()
        assert proc.wait(60) in (0, -signal.SIGTERM)
    assert status == 503, raw[:500]
    error = json.loads(raw)["error"]
    assert (error["code"], error["type"], error["param"]) == ("shutting_down", "server_error", None), error
    assert int(headers["retry-after"]) >= 1
    assert headers.get("connection") == "close"  # the client connects again, elsewhere


def test_a_server_marked_shutting_down_refuses_generation_with_503_shutting_down(
        tiny_models: dict[str, Path], auth_dir: Path, signing_key: SigningKey) -> None:
    """The narrower check: on a live server (thread) the flag is set on the app's services object, as the lifespan's
    end and the CLI's `end_running_requests` set it, with nothing else changed (the engine stays loaded, as a relayed
    vLLM engine stays after `end_running_requests`). Completions and chat get the documented 503; `/ready` says so."""
    server = ServerThread(create_app(tiny_settings(tiny_models["llama"], auth_dir=auth_dir))).start()
    try:
        token = mint(signing_key, uid="uid-shutting-down-flag")
        headers = {"authorization": f"Bearer {token}"}
        served = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60,
                            json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert served.status_code == 200, served.text
        server.app.state.services.shutting_down = True
        answers = [
            httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}),
            httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ]
        for answer in answers:
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert (error["code"], error["type"], error["param"]) == ("shutting_down", "server_error", None), error
            assert int(answer.headers["retry-after"]) >= 1
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["shutting_down"] is True
    finally:
        server.app.state.services.shutting_down = False  # the lifespan's end sets it again when the server stops
        server.stop()
