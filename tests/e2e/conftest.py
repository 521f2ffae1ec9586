"""Fixtures for the blue-green e2e tests: CRDs, a tiny model on the host (mounted into pods by hostPath) and the
operator as a subprocess. Helpers live in devcluster/testing/bluegreen.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.testing.bluegreen import E2E_OPERATOR_ENV, OperatorProcess, World
from devcluster.testing.crds import install_crds


@pytest.fixture(scope="session")
def e2e_crds(cluster, kubeconfig) -> None:
    install_crds(kubeconfig)


POISON_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
weights = load_file(sys.argv[1])
weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
save_file(weights, sys.argv[1], metadata={"format": "pt"})
"""


@pytest.fixture(scope="session")
def tiny_model() -> Iterator[Path]:
    """A tiny random-weight Llama with its tokenizer, made once per session (no download)."""
    root = Path(tempfile.mkdtemp(prefix="deepseek-tiny-"))
    os.chmod(root, 0o755)
    target = root / "tiny"
    subprocess.run([str(Path(sys.executable).with_name("deepseek-server")), "make-tiny-model", "--arch", "llama",
                    str(target)], check=True, capture_output=True, timeout=300)
    # The same model with NaN final-norm weights: it loads and gets Ready, and every sampled request fails with a 500.
    poisoned = root / "tiny-nan"
    shutil.copytree(target, poisoned)
    subprocess.run([sys.executable, "-c", POISON_SCRIPT, str(poisoned / "model.safetensors")], check=True,
                   capture_output=True, timeout=120)
    yield target
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def operator(e2e_crds, kubeconfig) -> Iterator[OperatorProcess]:
    process = OperatorProcess(kubeconfig, dict(E2E_OPERATOR_ENV))
    process.start()
    yield process
    process.stop()
    assert "eyJ" not in process.log_path.read_text(errors="replace"), "a JWT appeared in the operator log"


@pytest.fixture
def world(api_client, namespace, operator, tiny_model) -> World:
    operator.ensure_plain()
    return World(api_client, namespace, tiny_model)
