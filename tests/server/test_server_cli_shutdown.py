"""The `deepseek-server serve` command: settings from flags and environment, loud --auth disabled, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from deepseek_server.settings import ServerSettings
from server_harness import server_process


def test_serve_refuses_to_start_without_an_auth_source(tiny_models: dict[str, Path]) -> None:
    result = subprocess.run([sys.executable, "-m", "deepseek_server", "serve", "--model", str(tiny_models["llama"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--auth-dir" in result.stderr and "--auth disabled" in result.stderr


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
    env = {"DEEPSEEK_MODEL": str(tiny_models["llama"]), "DEEPSEEK_PRECISION": "fp32", "DEEPSEEK_DEVICE": "cpu",
           "DEEPSEEK_MAX_NEW_TOKENS": "400", "DEEPSEEK_MAX_MODEL_LEN": "512"}
    with server_process(["--auth", "disabled", "--model-name", "tiny", "--shutdown-grace-s", "20"], env=env,
                        log_dir=tmp_path) as (url, proc):
        assert httpx.get(f"{url}/v1/models").status_code == 200  # no key needed
        assert "warning" in httpx.get(f"{url}/ready").json()
        lines: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "long", "max_tokens": 400, "temperature": 1.0,
                                    "stream": True}) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):  # no new connections once shutdown began
            httpx.get(f"{url}/health", timeout=2)
        reader.join(60)
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is "terminated by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
    assert lines[-1] == "data: [DONE]", "the in-flight stream was cut by shutdown"
    assert len(lines) > 5
    log = (tmp_path / "server-0.log").read_text()
    assert "AUTHENTICATION IS DISABLED" in log
    assert "Finished server process" in log
