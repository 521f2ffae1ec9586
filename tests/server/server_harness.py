"""Test harness for the model server: minting tokens per docs/auth-contract.md, auth dirs, live servers."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from deepseek_server.settings import ServerSettings

LIMITED_UID = "uid-limited"  # rps 0.5, burst 3
TOKENS_UID = "uid-tokens"  # tpm 40
SPECIAL_LIMITS = {
    LIMITED_UID: {"rps": 0.5, "burst": 3, "tpm": None, "parallel": None},
    TOKENS_UID: {"rps": 100, "burst": 100, "tpm": 40, "parallel": None},
}

NAMESPACE, DEPLOYMENT = "team-a", "chat"
ISSUER = f"deepseek-operator/{NAMESPACE}/{DEPLOYMENT}"
AUDIENCE = f"{NAMESPACE}/{DEPLOYMENT}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(self.public_raw()), "kid": self.kid, "use": "sig",
                "alg": "EdDSA"}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": ["model:predict", "history:read"], "env": "dev",
        "uid": "uid-default", "jti": b64url(secrets.token_bytes(16)), "iat": now, "nbf": now, "exp": now + 3600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: SigningKey, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    """A token signed by `key` (EdDSA), with contract claims overridden by keyword (None drops a claim)."""
    return jwt.encode(claims(**overrides), key.private, algorithm="EdDSA", headers={"kid": key.kid, **(headers or {})})


def write_json_atomically(path: Path, document: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def write_auth_dir(directory: Path, keys: list[SigningKey], *, default_limits: dict[str, Any] | None = None,
                   limits: dict[str, Any] | None = None, revoked: dict[str, int] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomically(directory / "config.json", {
        "issuer": ISSUER, "audience": AUDIENCE, "generation": 1,
        "defaultLimits": default_limits or {"rps": 1000, "burst": 1000, "tpm": None, "parallel": None}})
    write_json_atomically(directory / "jwks.json", {"keys": [k.jwk() for k in keys]})
    write_json_atomically(directory / "revoked.json", revoked or {})
    write_json_atomically(directory / "limits.json", limits or {})
    return directory


class ServerThread:
    """A real uvicorn server on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 120) -> ServerThread:
        self.thread.start()
        wait_ready(self.url, ready_timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            response = httpx.get(f"{url}/ready", timeout=1)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready within {timeout} s: {last}")


@contextmanager
def server_process(args: list[str], env: dict[str, str] | None = None, timeout: float = 180,
                   log_dir: Path | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`deepseek-server serve ARGS --port <free>` as a subprocess; yields (url, process)."""
    with server_processes([args], env, timeout, log_dir) as started:
        yield started[0]


@contextmanager
def server_processes(arg_sets: list[list[str]], env: dict[str, str] | None = None, timeout: float = 180,
                     log_dir: Path | None = None) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """Several `deepseek-server serve` processes started together (they load in parallel), stopped with SIGTERM."""
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs = []
    try:
        for index, args in enumerate(arg_sets):
            port = free_port()
            out = open(log_dir / f"server-{index}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
            logs.append(out)
            proc = subprocess.Popen(
                [sys.executable, "-m", "deepseek_server", "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            )
            started.append((f"http://127.0.0.1:{port}", proc))
        for url, proc in started:
            wait_ready(url, timeout, proc)
        yield started
    finally:
        for _, proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for out in logs:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]


def tiny_settings(model: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {"model": str(model), "model_name": "deepseek-tiny", "precision": "fp32",
                              "device": "cpu", "max_model_len": 256, "max_new_tokens": 64, "max_batch_size": 16}
    values.update(overrides)
    return ServerSettings(**values)
