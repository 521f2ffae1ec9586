#!/usr/bin/env bash
# The built-in engine on a GPU machine, one command, from the repository root (see bench/gpu_check.py):
#   bash bench/gpu_check.sh            deepseek-llm-7b's shape on the GPU (one H200: about 3 minutes)
#   bash bench/gpu_check.sh --tiny     the same code on the CPU with a tiny model
# Needs only torch, transformers and accelerate; no network. For the 8-bit part, bring bitsandbytes' wheel in .whl/
# (`pip download --no-deps bitsandbytes -d .whl`, 43 MB): it is installed from there into a scratch directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch, transformers' 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch and transformers; set PYTHON to an interpreter that has them" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import bitsandbytes' 2>/dev/null; then
  wheel=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then
    site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    trap 'rm -rf "$site"' EXIT
    if "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$site" "$wheel"; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "gpu_check: could not install $wheel; the 8-bit part will be skipped" >&2
    fi
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
timeout 470 "$PYTHON" bench/gpu_check.py "$@"
