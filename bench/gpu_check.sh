#!/usr/bin/env bash
# The built-in engine on a GPU machine, one command, from the repository root (see bench/gpu_check.py):
#   bash bench/gpu_check.sh            deepseek-llm-7b's shape on the GPU (one H200: about 3 minutes)
#   bash bench/gpu_check.sh --tiny     the same code on the CPU with a tiny model
#   bash bench/gpu_check.sh --wheels [PYTHON_VERSION]
#                                      on a machine with PyPI: download into .whl/ the wheels the check installs
#                                      (the versions in .venv, for Python 3.12 unless told; about 50 MB)
# Needs torch, transformers and accelerate, and no network. The engine's other packages (xgrammar, which needs
# pydantic, for JSON output; bitsandbytes for the 8-bit part) are installed from the wheels in .whl/ into a scratch
# directory when the interpreter lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the engine imports beyond torch, transformers and accelerate, as distribution names.
ENGINE_WHEELS=(xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection bitsandbytes)

if [ "${1:-}" = "--wheels" ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  pins=$("$PYTHON" - "${ENGINE_WHEELS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
except PackageNotFoundError as exc:
    sys.exit(f"gpu_check: {exc.name} is not installed in {sys.executable}; run `make dev` first")
EOF
)
  pyver=${2:-3.12}
  mkdir -p .whl
  # shellcheck disable=SC2086  # one argument per pin
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
  ls -l .whl
  exit 0
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch, transformers' 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch and transformers; set PYTHON to an interpreter that has them" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import xgrammar, bitsandbytes' 2>/dev/null; then
  wheels=(.whl/*.whl)
  if [ -e "${wheels[0]}" ]; then
    site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    trap 'rm -rf "$site"' EXIT
    if "$PYTHON" -m pip install --quiet --no-deps --no-index --no-compile --target "$site" "${wheels[@]}"; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
      echo "gpu_check: installed from .whl/: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    else
      echo "gpu_check: could not install the wheels in .whl/" >&2
    fi
  else
    echo "gpu_check: $PYTHON lacks xgrammar or bitsandbytes and .whl/ holds no wheels (bash bench/gpu_check.sh --wheels)" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
timeout 470 "$PYTHON" bench/gpu_check.py "$@"
