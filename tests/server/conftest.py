"""Fixtures for the model server tests: tiny models, signing keys, an auth directory and live servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from deepseek_server.app import create_app

from devcluster.testing.model_server import (
    SPECIAL_LIMITS,
    ServerThread,
    SigningKey,
    mint,
    tiny_settings,
    write_auth_dir,
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three tiny architectures, written once per session by make-tiny-model's code path."""
    from deepseek_server.tiny_model import ARCHITECTURES, make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / f"tiny-{arch}") for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey(kid="key-2026-01")


@pytest.fixture(scope="session")
def auth_dir(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey) -> Path:
    return write_auth_dir(tmp_path_factory.mktemp("auth"), [signing_key], limits=SPECIAL_LIMITS)


@pytest.fixture(scope="session")
def token_factory(signing_key: SigningKey) -> Callable[..., str]:
    def make(**overrides: Any) -> str:
        return mint(signing_key, **overrides)

    return make


@pytest.fixture(scope="session")
def audit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="session")
def llama_server(tiny_models: dict[str, Path], auth_dir: Path, audit_path: Path) -> Iterator[ServerThread]:
    """The main server under test: tiny Llama, auth from a directory, audit to a file, no Redis."""
    settings = tiny_settings(tiny_models["llama"], auth_dir=auth_dir, audit_log=audit_path,
                             max_body_bytes=64 * 1024)
    server = ServerThread(create_app(settings)).start()
    yield server
    server.stop()
