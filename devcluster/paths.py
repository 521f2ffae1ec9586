"""Where devcluster keeps built binaries and the state of clusters started from the CLI."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Binary cache: $DEVCLUSTER_CACHE, else ~/.cache/deepseek-operator/devcluster."""
    override = os.environ.get("DEVCLUSTER_CACHE")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "deepseek-operator" / "devcluster"


def clusters_root() -> Path:
    """State of clusters started with `python -m devcluster up` (one folder per cluster name)."""
    return cache_root() / "clusters"
