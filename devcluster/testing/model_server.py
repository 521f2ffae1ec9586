"""A live model server for tests and benchmarks: tokens minted per docs/auth-contract.md, auth directories, the
server in a thread (`ServerThread`) or as `deepseek-server serve` subprocesses (`server_process(es)`)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from devcluster.testing.ports import bound_socket, free_port, lost_bind_race

LIMITED_UID = "uid-limited"  # rps 0.5, burst 3
BURST_UID = "uid-burst"  # rps 0.5, burst 3: for one test that needs a full bucket at its start
TOKENS_UID = "uid-tokens"  # tpm 40
# rps 0.01, burst 3: the fourth request is refused however slowly the first three are answered (a loaded machine)
SLOW_REFILL_UID = "uid-slow-refill"
SPECIAL_LIMITS = {
    SLOW_REFILL_UID: {"rps": 0.01, "burst": 3, "tpm": None, "parallel": None},
    LIMITED_UID: {"rps": 0.5, "burst": 3, "tpm": None, "parallel": None},
    BURST_UID: {"rps": 0.5, "burst": 3, "tpm": None, "parallel": None},
    TOKENS_UID: {"rps": 100, "burst": 100, "tpm": 40, "parallel": None},
}

NAMESPACE, DEPLOYMENT = "team-a", "chat"
ISSUER = f"deepseek-operator/{NAMESPACE}/{DEPLOYMENT}"
AUDIENCE = f"{NAMESPACE}/{DEPLOYMENT}"
BIND_ATTEMPTS = 5


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
    """A real uvicorn server on a loopback port it holds from the start, in a daemon thread (`host="::1"`: on the
    IPv6 loopback)."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.app = app
        self.host = host
        self.socket = bound_socket(host)
        self.port = int(self.socket.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 120) -> ServerThread:
        self.thread.start()
        wait_ready(self.url, ready_timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


class ServerExited(RuntimeError):
    """The server process ended before it became ready."""


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerExited(f"server exited with {proc.returncode} before becoming ready")
        try:
            response = httpx.get(f"{url}/ready", timeout=5)
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


@dataclass
class _Started:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


def _spawn(args: list[str], env: dict[str, str] | None, log_path: Path) -> _Started:
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepseek_server", "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
    )
    return _Started(f"http://127.0.0.1:{port}", proc, log_path, log)


@contextmanager
def server_processes(arg_sets: list[list[str]], env: dict[str, str] | None = None, timeout: float = 180,
                     log_dir: Path | None = None) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """Several `deepseek-server serve` processes started together (they load in parallel), stopped with SIGTERM.

    Logs go to `log_dir/server-<index>.log` (a temporary folder without `log_dir`). A process that lost its port to
    another process between the port's choice and its bind is started again on another port.
    """
    folder = log_dir or Path(tempfile.mkdtemp(prefix="deepseek-server-logs-"))
    started: list[_Started] = []
    try:
        for index, args in enumerate(arg_sets):
            started.append(_spawn(args, env, folder / f"server-{index}.log"))
        for index, args in enumerate(arg_sets):
            for attempt in range(BIND_ATTEMPTS):
                current = started[index]
                try:
                    wait_ready(current.url, timeout, current.proc)
                    break
                except ServerExited:
                    current.log.close()
                    text = current.log_path.read_text(errors="replace")
                    if attempt + 1 == BIND_ATTEMPTS or not lost_bind_race(text):
                        raise ServerExited(f"server {index} exited with {current.proc.returncode} before becoming "
                                           f"ready; its log ends:\n{text[-3000:]}") from None
                    started[index] = _spawn(args, env, current.log_path)
        yield [(s.url, s.proc) for s in started]
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in started:
            try:
                s.proc.wait(30)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
            s.log.close()


def tiny_settings(model: Path, **overrides: Any) -> Any:
    """ServerSettings for a tiny model on the CPU (fp32, short context), with fields overridden by keyword."""
    from deepseek_server.settings import ServerSettings

    values: dict[str, Any] = {"model": str(model), "model_name": "deepseek-tiny", "precision": "fp32",
                              "device": "cpu", "max_model_len": 256, "max_new_tokens": 64, "max_batch_size": 16}
    values.update(overrides)
    return ServerSettings(**values)
