"""devcluster's stand-in for the vllm/vllm-openai entry point: pod args -> vLLM's OpenAI server args, honestly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devcluster import vllm_entry, vllm_env
from devcluster.cluster import default_image_commands
from devcluster.processes import image_command

ENTRY = Path(vllm_entry.__file__)


def test_first_positional_is_the_model_as_for_vllm_serve() -> None:
    args, notes = vllm_entry.server_args(["/models/chat", "--served-model-name", "chat", "--port", "8001"])
    assert args == ["--model", "/models/chat", "--served-model-name", "chat", "--port", "8001"]
    assert notes == []


def test_tensor_parallel_becomes_one_with_a_note_in_every_spelling() -> None:
    for spelling in (["--tensor-parallel-size", "4"], ["--tensor-parallel-size=4"], ["-tp", "4"]):
        args, notes = vllm_entry.server_args(["/m", *spelling, "--max-model-len", "256"])
        assert args == ["--model", "/m", "--max-model-len", "256"], spelling
        assert len(notes) == 1 and "--tensor-parallel-size 4 -> 1" in notes[0] and "simulated" in notes[0]


def test_parallel_size_one_passes_without_a_note() -> None:
    args, notes = vllm_entry.server_args(["/m", "--tensor-parallel-size", "1"])
    assert args == ["--model", "/m"] and notes == []


def test_serve_subcommand_and_model_flag_are_accepted() -> None:
    assert vllm_entry.server_args(["serve", "/m"])[0] == ["--model", "/m"]
    assert vllm_entry.server_args(["--model", "/m", "--dtype", "float32"])[0] == ["--model", "/m", "--dtype",
                                                                                   "float32"]


def test_pod_env_wins_over_the_defaults() -> None:
    env = vllm_entry.server_env({"VLLM_CPU_KVCACHE_SPACE": "3", "PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["PATH"] == "/bin"
    assert vllm_entry.server_env({})["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_missing_virtualenv_fails_the_container_saying_what_to_run(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ENTRY), "--vllm-venv", str(tmp_path / "nope"), "--", "/m"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "make vllm-env" in result.stderr and str(tmp_path / "nope") in result.stderr


def test_the_vllm_image_maps_to_the_entry_point_with_the_pod_args_after_it() -> None:
    argv = image_command("vllm/vllm-openai:v0.32.0", default_image_commands())
    assert argv is not None and argv[1] == str(ENTRY)
    assert argv[-3:] == ["--vllm-venv", str(vllm_env.venv_dir()), "--"]


def test_cpu_requirements_drop_local_cpu_versions_and_extras() -> None:
    reqs = vllm_env.cpu_requirements(['torch==2.13.0+cpu; platform_machine == "x86_64"', "numpy",
                                      'pytest; extra == "test"', "torchaudio==2.13.0+cpu"])
    assert reqs == ['torch==2.13.0; platform_machine == "x86_64"', "numpy", "torchaudio==2.13.0"]


def test_fp8_quantization_is_dropped_with_a_note_other_flags_kept() -> None:
    for spelling in (["--quantization", "fp8"], ["--quantization=fp8"], ["-q", "fp8"]):
        args, notes = vllm_entry.server_args(["/m", *spelling, "--gpu-memory-utilization", "0.9", "--dtype",
                                              "bfloat16"])
        assert args == ["--model", "/m", "--gpu-memory-utilization", "0.9", "--dtype", "bfloat16"], spelling
        assert len(notes) == 1 and "--quantization fp8" in notes[0]
    args, notes = vllm_entry.server_args(["/m", "--quantization", "awq"])
    assert args == ["--model", "/m", "--quantization", "awq"] and notes == []


def test_missing_python312_is_reported_with_where_it_was_looked_for(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(vllm_env.VllmEnvError, match=r"needs Python 3\.12") as err:
        vllm_env.find_python312()
    assert str(tmp_path / ".pyenv") in str(err.value) and "make vllm-env" in str(err.value)
