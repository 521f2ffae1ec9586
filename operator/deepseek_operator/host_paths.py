"""Which `hostPath` model sources the cluster admin allows (pure).

A hostPath volume mounts a node's directory into the pod: whoever may create a DeepSeekDeployment could otherwise
read any file on the node through the model server. The operator therefore mounts a hostPath only under a prefix
the admin lists (the chart's `operator.allowedHostPathPrefixes`, env `DEEPSEEK_OPERATOR_ALLOWED_HOST_PATH_PREFIXES`);
with none listed, hostPath sources are refused and `pvc` or `huggingFace` is the way to bring weights.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

SETTING = "DEEPSEEK_OPERATOR_ALLOWED_HOST_PATH_PREFIXES"


def _under(path: str, prefix: str) -> bool:
    prefix = posixpath.normpath(prefix)
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def host_path_refusal(spec: Mapping[str, Any], allowed_prefixes: Iterable[str]) -> str | None:
    """Why the spec's hostPath model source may not be mounted, or None (no hostPath, or under an allowed prefix)."""
    source = (spec.get("model") or {}).get("source") or {}
    if "hostPath" not in source:
        return None
    raw = str((source.get("hostPath") or {}).get("path", ""))
    prefixes = [p for p in allowed_prefixes if p]
    # Compare the path as the kubelet will resolve it: `/models/../etc` is `/etc`.
    path = posixpath.normpath(raw) if raw.startswith("/") else ""
    if not path:
        return f"spec.model.source.hostPath.path {raw!r} is not an absolute path"
    if any(_under(path, prefix) for prefix in prefixes):
        return None
    if not prefixes:
        return (f"spec.model.source.hostPath {raw!r} is refused: this operator allows no hostPath model sources "
                "(its allowedHostPathPrefixes setting is empty); use spec.model.source.pvc or huggingFace, or ask "
                "the cluster admin to allow a prefix")
    return (f"spec.model.source.hostPath {raw!r} is not under an allowed prefix ({', '.join(prefixes)}); move the "
            "weights there, use spec.model.source.pvc or huggingFace, or ask the cluster admin to allow the path")
