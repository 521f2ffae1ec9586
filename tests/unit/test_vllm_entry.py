"""devcluster's stand-in for the vllm/vllm-openai entry point: pod args -> vLLM's OpenAI server args, honestly."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

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


def _free(**by_place: float) -> Callable[[Path], SimpleNamespace]:
    """A disk_usage stand-in: GiB free at each place (by its path as text), `default` elsewhere."""
    return lambda place: SimpleNamespace(free=int(by_place.get(str(place), by_place.get("default", 0))
                                                  * vllm_env.GIB))


def test_too_little_space_is_reported_with_what_is_needed_and_free(tmp_path: Path) -> None:
    venv = tmp_path / "a" / "venv"  # not made yet: its nearest existing folder's filesystem counts
    problem = vllm_env.space_shortfall(venv, tmp_path, usage=_free(default=5))
    assert problem is not None
    assert "11.0 GiB free for the environment and pip's downloads" in problem
    assert f"filesystem of {tmp_path}, which has 5.0 GiB free" in problem
    assert "VLLM_VENV" in problem and "make vllm-env" in problem
    assert vllm_env.space_shortfall(venv, tmp_path, usage=_free(default=11)) is None


def test_a_half_made_environment_counts_what_it_already_holds(tmp_path: Path) -> None:
    assert vllm_env.space_shortfall(tmp_path / "venv", tmp_path, usage=_free(default=6)) is not None
    assert vllm_env.space_shortfall(tmp_path / "venv", tmp_path, usage=_free(default=6),
                                    already=6 * vllm_env.GIB) is None


def test_temporary_directory_on_another_filesystem_is_checked_for_the_downloads_alone(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    assert vllm_env.space_shortfall(tmp_path / "venv", other, usage=_free(**{str(tmp_path): 7, "/dev/shm": 4})) is None
    problem = vllm_env.space_shortfall(tmp_path / "venv", other, usage=_free(**{str(tmp_path): 7, "/dev/shm": 3}))
    assert problem is not None and "4.0 GiB free for pip's downloads (the temporary directory)" in problem
    problem = vllm_env.space_shortfall(tmp_path / "venv", other, usage=_free(**{str(tmp_path): 6, "/dev/shm": 9}))
    assert problem is not None and "7.0 GiB free for the environment on" in problem


def test_install_stops_before_making_anything_when_space_is_short(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_env, "find_python312", lambda: sys.executable)
    monkeypatch.setattr(vllm_env.shutil, "disk_usage", _free(default=1))

    def no_install(cmd: list[str], log: object) -> None:
        raise AssertionError(f"ran {cmd} although the space is short")

    monkeypatch.setattr(vllm_env, "_run", no_install)
    venv = tmp_path / "venv"
    with pytest.raises(vllm_env.VllmEnvError, match=r"needs about 11\.0 GiB free"):
        vllm_env.install(venv)
    assert not venv.exists()
