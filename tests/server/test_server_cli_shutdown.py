"""The `deepseek-server serve` command: settings from flags and environment, loud --auth disabled, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from deepseek_server.settings import ServerSettings
from pydantic import ValidationError

from devcluster.testing.model_server import server_process
from devcluster.testing.polling import wait_for
from devcluster.testing.ports import bound_socket, free_port


def test_serve_refuses_to_start_without_an_auth_source(tiny_models: dict[str, Path]) -> None:
    result = subprocess.run([sys.executable, "-m", "deepseek_server", "serve", "--model", str(tiny_models["llama"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--auth-dir" in result.stderr and "--auth disabled" in result.stderr


@pytest.mark.parametrize("url", ["notaurl", "http://:s3cret-pass@127.0.0.1:6379/0"])
def test_a_redis_url_that_is_not_one_is_refused_in_one_line_without_echoing_it(url: str,
                                                                               tiny_models: dict[str, Path]) -> None:
    result = subprocess.run([sys.executable, "-m", "deepseek_server", "serve", "--model", str(tiny_models["llama"]),
                             "--auth", "disabled", "--redis-url", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "deepseek-server: redis_url: Value error, must be a redis://, rediss:// or unix:// URL (the value given is "
        "not shown: it may hold a password)"]
    assert url not in result.stderr and "s3cret" not in result.stderr


def test_a_redis_url_with_a_port_that_is_not_a_number_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as excinfo:
        ServerSettings(auth="disabled", redis_url="redis://:s3cret-pass@redis-host:63x79/0")
    [error] = excinfo.value.errors()
    assert error["loc"] == ("redis_url",) and "has a port that is not a number" in error["msg"]
    assert "s3cret" not in error["msg"] and "63x79" not in error["msg"]  # serve prints `msg` only


def test_settings_with_a_redis_password_never_show_it_in_their_repr() -> None:
    settings = ServerSettings(auth="disabled", redis_url="redis://:s3cret-pass@redis-host:6379/0")
    assert settings.redis_url is not None and "s3cret" not in repr(settings) and "s3cret" not in str(settings)


@pytest.mark.parametrize("model", ["missing", "empty", "no-weights"])
def test_a_model_that_cannot_be_loaded_ends_the_process_with_the_reason_last(model: str, tmp_path: Path,
                                                                            tiny_models: dict[str, Path]) -> None:
    # Serving nothing while looking alive would hold a rollout until its deadline; exiting lets Kubernetes restart
    # the container and show the reason (the end of the log, terminationMessagePolicy FallbackToLogsOnError).
    path = tmp_path / model
    if model == "empty":
        path.mkdir()
    elif model == "no-weights":  # config and tokenizer, but no weights
        shutil.copytree(tiny_models["llama"], path, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    result = subprocess.run([sys.executable, "-m", "deepseek_server", "serve", "--auth", "disabled", "--device", "cpu",
                             "--model", str(path), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("deepseek-server: the model could not be loaded: "), result.stderr[-2000:]
    assert str(path) in last or model == "no-weights", last


@pytest.mark.parametrize("value", ["0", "abc", "-1"])
def test_an_onednn_cache_size_that_is_not_a_positive_number_is_refused_in_one_line(
        value: str, tiny_models: dict[str, Path]) -> None:
    # PyTorch's oneDNN wrapper reads LRU_CACHE_CAPACITY at its first matmul: 0 (or text, read as 0) ends the process
    # with a segmentation fault and no word of why; a negative size leaves the cache unbounded
    result = subprocess.run([sys.executable, "-m", "deepseek_server", "serve", "--auth", "disabled", "--device", "cpu",
                             "--model", str(tiny_models["llama"]), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LRU_CACHE_CAPACITY": value})
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "deepseek-server: the model could not be loaded: ValueError: LRU_CACHE_CAPACITY (the number of compiled "
        f"matmuls PyTorch's oneDNN wrapper keeps) must be a positive whole number, not {value!r}; unset it for "
        "the server's default of 256")


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEEPSEEK_AUTH_CONFIGMAP", "team-a/chat-auth")
    monkeypatch.setenv("DEEPSEEK_MAX_NEW_TOKENS", "77")
    monkeypatch.setenv("DEEPSEEK_NO_CACHE", "true")
    settings = ServerSettings(model=str(tmp_path))
    assert (settings.auth_configmap, settings.max_new_tokens, settings.cache_enabled) == ("team-a/chat-auth", 77,
                                                                                         False)
    assert ServerSettings(model=str(tmp_path), max_new_tokens=5).max_new_tokens == 5  # a flag beats the env


def test_auth_disabled_warns_and_sigterm_finishes_in_flight_streams(tiny_models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_models["llama"]).eos_token_id
    env = {"DEEPSEEK_MODEL": str(tiny_models["llama"]), "DEEPSEEK_PRECISION": "fp32", "DEEPSEEK_DEVICE": "cpu",
           "DEEPSEEK_MAX_NEW_TOKENS": "400", "DEEPSEEK_MAX_MODEL_LEN": "512"}
    with server_process(["--auth", "disabled", "--model-name", "tiny", "--shutdown-grace-s", "60"], env=env,
                        log_dir=tmp_path) as (url, proc):
        assert httpx.get(f"{url}/v1/models").status_code == 200  # no key needed
        assert "warning" in httpx.get(f"{url}/ready").json()
        lines: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            # 400 tokens for sure: a seed, and the end-of-sequence token banned
            with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                              json={"model": "tiny", "prompt": "long", "max_tokens": 400, "temperature": 1.0,
                                    "seed": 5, "logit_bias": {str(eos): -100}, "stream": True}) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(120)
        proc.send_signal(signal.SIGTERM)
        at_sigterm = len(lines)

        def refused() -> bool:
            try:
                httpx.get(f"{url}/health", timeout=2)
            except httpx.HTTPError:
                return True
            return False

        # no new connections once shutdown began, while the process still drains the stream
        wait_for("the server to refuse new connections", refused, timeout=60, interval=0.05)
        assert proc.poll() is None, "the server exited instead of finishing the in-flight stream"
        reader.join(120)
        assert not reader.is_alive()
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is "terminated by SIGTERM"
        assert proc.wait(60) in (0, -signal.SIGTERM)
    assert lines[-1] == "data: [DONE]", "the in-flight stream was cut by shutdown"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) > at_sigterm + 1, f"no chunk arrived after SIGTERM ({at_sigterm} before, {len(chunks)} in all)"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    log = (tmp_path / "server-0.log").read_text()
    assert "AUTHENTICATION IS DISABLED" in log
    assert "Finished server process" in log


@pytest.mark.parametrize("grace", ["2", "0.5"])
def test_sigterm_ends_requests_still_running_when_the_grace_is_over(grace: str, tmp_path: Path) -> None:
    # A stream longer than --shutdown-grace-s is cut by the server: it must still end as OpenAI's streams end
    # (finish_reason "length", then [DONE]), and a non-streamed request still running gets its 200, not a bare 500.
    # A grace under a second is kept as given (cut at half of it), not rounded down to none.
    from deepseek_server.tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    model = make_tiny_model("llama", tmp_path / "model", max_len=4096)  # room for a stream far longer than the grace
    eos = AutoTokenizer.from_pretrained(model).eos_token_id
    env = {"DEEPSEEK_MODEL": str(model), "DEEPSEEK_PRECISION": "fp32", "DEEPSEEK_DEVICE": "cpu",
           "DEEPSEEK_MAX_NEW_TOKENS": "4000"}
    audit = tmp_path / "audit.jsonl"
    body = {"model": "tiny", "prompt": "long", "max_tokens": 4000, "temperature": 1.0, "seed": 5,
            "logit_bias": {str(eos): -100}}
    lines: list[str] = []
    answers: list[httpx.Response] = []
    errors: list[BaseException] = []
    first_chunk = threading.Event()
    with server_process(["--auth", "disabled", "--model-name", "tiny", "--shutdown-grace-s", grace,
                         "--audit-log", str(audit)], env=env, log_dir=tmp_path) as (url, proc):

        def stream() -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                                  json={**body, "stream": True}) as response:
                    for line in response.iter_lines():
                        if line:
                            lines.append(line)
                            first_chunk.set()
            except httpx.HTTPError as exc:
                errors.append(exc)

        def whole() -> None:
            try:
                answers.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120))
            except httpx.HTTPError as exc:
                errors.append(exc)

        readers = [threading.Thread(target=whole), threading.Thread(target=stream)]
        for reader in readers:
            reader.start()
        assert first_chunk.wait(120)
        proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(60)
            assert not reader.is_alive()
        assert proc.wait(60) in (0, -signal.SIGTERM)
    assert not errors, f"a request was cut off: {errors}"
    assert lines[-1] == "data: [DONE]", f"the stream ended without [DONE]: {lines[-1][:200]}"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    assert len(chunks) < 4000  # cut, not run to its end
    assert answers[0].status_code == 200, answers[0].text[:300]
    assert answers[0].json()["choices"][0]["finish_reason"] == "length"
    assert answers[0].json()["usage"]["completion_tokens"] < 4000
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(r["status"] for r in records if r["path"] == "/v1/completions") == [200, 200]


def test_a_request_still_running_when_the_grace_ends_is_cancelled_then_not_later() -> None:
    """uvicorn's own shutdown, after the drain, gets what is left of the grace, fractions included: a request that
    outlives the grace (nothing cuts it, as a relayed vLLM stream) is cancelled when the grace ends, so the process
    stops within the pod's terminationGracePeriodSeconds (the preStop wait plus the grace), not a second after."""
    from deepseek_server.draining import Draining, DrainingServer

    async def endless_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        while True:
            await send({"type": "http.response.body", "body": b"more\n", "more_body": True})
            await asyncio.sleep(0.02)

    sock = bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(endless_stream, host="127.0.0.1", port=port, lifespan="off", log_level="critical",
                            timeout_graceful_shutdown=0.5)  # a float, as serve passes it
    server = DrainingServer(config, Draining())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for("the server to listen", lambda: server.started, timeout=30, interval=0.02)
        with httpx.stream("GET", f"http://127.0.0.1:{port}/", timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines) == "more"
            server.should_exit = True  # what SIGTERM sets; uvicorn's loop notices it within 0.1 s
            stopping = time.monotonic()
            with pytest.raises(httpx.RemoteProtocolError):  # cancelled mid-body: the chunked body never ends
                for _ in lines:
                    pass
            cut_after = time.monotonic() - stopping
        thread.join(30)
        assert not thread.is_alive()
    finally:
        server.should_exit = True
        sock.close()
    # 0.1 s to notice the stop, the 0.5 s grace (the drain), uvicorn's own 0.1 s pause: about 0.7 s; uvicorn was given
    # a second more after the drain (about 1.7 s). The bound leaves room for a loaded machine.
    assert 0.5 <= cut_after < 1.45, cut_after


def test_responses_do_not_name_the_server_software(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    env = {"DEEPSEEK_MODEL": str(tiny_models["llama"]), "DEEPSEEK_PRECISION": "fp32", "DEEPSEEK_DEVICE": "cpu"}
    with server_process(["--auth", "disabled", "--model-name", "tiny"], env=env, log_dir=tmp_path) as (url, _):
        answers = [httpx.get(f"{url}/health"), httpx.get(f"{url}/v1/models"), httpx.get(f"{url}/v1/nowhere"),
                   httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})]
    assert [answer.status_code for answer in answers] == [200, 200, 404, 200]
    assert [answer.headers.get("server") for answer in answers] == [None] * 4


def _exchange(url: str, data: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Send raw bytes on a new connection, read until the server closes it: the answers (status, headers, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(headers[b"content-length"])
        answers.append((lines[0].split(b" ", 2)[1], headers, rest[:length]))
        received = rest[length:]
    return answers


NOT_HTTP = {
    "control character in a header": b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-note: a\x01b\r\n"
                                     b"content-length: 2\r\n\r\n{}",
    "header line without a colon": b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nnot a header\r\n\r\n",
    "body longer than its content-length": b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                                           b"application/json\r\ncontent-length: 2\r\n\r\n{}\x00\x01garbage\r\n",
}


def test_requests_that_are_not_http_get_an_openai_error_and_the_server_serves_on(tiny_models: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    """uvicorn answers what it cannot parse itself, before the app, with a plain-text 400; the server's answer is
    the same 400 and close, in OpenAI's error shape like every other error it gives."""
    env = {"DEEPSEEK_MODEL": str(tiny_models["llama"]), "DEEPSEEK_PRECISION": "fp32", "DEEPSEEK_DEVICE": "cpu"}
    with server_process(["--auth", "disabled", "--model-name", "tiny"], env=env, log_dir=tmp_path) as (url, _):
        for name, data in NOT_HTTP.items():
            answers = _exchange(url, data)  # a valid request before the bytes that are not HTTP is answered first
            status, headers, body = answers[-1]
            assert status == b"400", (name, answers)
            assert headers[b"content-type"] == b"application/json" and headers[b"connection"] == b"close", name
            assert b"server" not in headers, name
            error = json.loads(body)["error"]
            assert error["code"] == "invalid_http_request" and error["type"] == "invalid_request_error", name
            assert "not valid HTTP/1.1" in error["message"] and error["param"] is None, name
        served = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert served.status_code == 200


def test_sigterm_answers_a_request_on_an_open_keep_alive_connection_then_closes_it(tiny_models: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    # Behind a Service the pod has left the endpoints by now: a client whose next request on its open connection is
    # answered with "Connection: close" connects again elsewhere; one whose connection is cut off gets an error.
    env = {"DEEPSEEK_MODEL": str(tiny_models["llama"]), "DEEPSEEK_PRECISION": "fp32", "DEEPSEEK_DEVICE": "cpu"}
    with server_process(["--auth", "disabled", "--model-name", "tiny", "--shutdown-grace-s", "30",
                         "--drain-idle-s", "10"], env=env, log_dir=tmp_path) as (url, proc), \
            httpx.Client(base_url=url, timeout=30) as client:
        first = client.get("/v1/models")
        assert first.status_code == 200 and first.headers.get("connection") != "close"
        proc.send_signal(signal.SIGTERM)
        wait_for("the server to refuse new connections", lambda: _refused(url), timeout=60, interval=0.05)
        second = client.get("/v1/models")  # on the connection opened before the signal, idle since
        assert second.status_code == 200 and second.headers.get("connection") == "close"
        assert proc.wait(30) in (0, -signal.SIGTERM)


def test_sigterm_answers_a_request_begun_before_it_with_connection_close(tiny_models: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """A request the server is answering when SIGTERM comes (its response not started yet) is answered with
    "Connection: close", so the client does not send its next request on a connection about to close."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_models["llama"]).eos_token_id
    env = {"DEEPSEEK_MODEL": str(tiny_models["llama"]), "DEEPSEEK_PRECISION": "fp32", "DEEPSEEK_DEVICE": "cpu",
           "DEEPSEEK_MAX_NEW_TOKENS": "500", "DEEPSEEK_MAX_MODEL_LEN": "512"}
    with server_process(["--auth", "disabled", "--model-name", "tiny", "--shutdown-grace-s", "60",
                         "--drain-idle-s", "10"], env=env, log_dir=tmp_path) as (url, proc), \
            httpx.Client(base_url=url, timeout=120) as client:
        before = client.get("/v1/models")  # the connection the request will use, kept alive
        assert before.status_code == 200 and before.headers.get("connection") != "close"
        answers: list[httpx.Response] = []
        # 500 tokens for sure (a seed, the end-of-sequence token banned): a second or more of work on this CPU
        body = {"model": "tiny", "prompt": "long", "max_tokens": 500, "temperature": 1.0, "seed": 5,
                "logit_bias": {str(eos): -100}}
        asking = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=body)))
        asking.start()

        def in_flight() -> bool:
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            return "deepseek_requests_in_flight 1.0" in metrics

        wait_for("the completion to be in flight", in_flight, timeout=60, interval=0.02)
        proc.send_signal(signal.SIGTERM)
        asking.join(120)
        assert not asking.is_alive()
        [answer] = answers
        assert answer.status_code == 200, answer.text[:300]
        assert answer.json()["usage"]["completion_tokens"] == 500
        assert answer.headers.get("connection") == "close"
        assert proc.wait(60) in (0, -signal.SIGTERM)


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.HTTPError:
        return True
    return False


def test_an_empty_host_serves_ipv4_and_ipv6_as_the_operators_pods_run_it(tiny_models: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """The operator starts servers with `--host ""`: every address of both families, so a pod answers its probes and
    Services at an IPv6 address too (IPv6 and IPv6-first clusters), and still at IPv4 ones."""
    port = free_port()
    env = {**os.environ, "DEEPSEEK_MODEL": str(tiny_models["llama"]), "DEEPSEEK_PRECISION": "fp32",
           "DEEPSEEK_DEVICE": "cpu"}
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "deepseek_server", "serve", "--auth", "disabled", "--model-name",
                             "tiny", "--host", "", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for url in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
            wait_for(f"the server at {url}", lambda url=url: _answers(f"{url}/health"), timeout=120, interval=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
