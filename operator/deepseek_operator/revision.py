"""The revision of a DeepSeekDeployment: a stable hash of the spec fields that change its pods.

`replicas`, `rollout`, `rateLimit` and `auth` are left out on purpose: scaling, rollout tuning, default limits and
scopes never need new pods (limits and keys reach the servers through the auth ConfigMap). `engine` counts only
for vllm, with its defaults resolved: a builtin pod does not depend on it, so writing `engine: {name: builtin}` out,
or an operator that knows engines at all, never changes the revision of a builtin deployment.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .engines import engine_fingerprint

# The spec fields whose change means new server pods, hence a blue-green rollout.
POD_AFFECTING_FIELDS = ("model", "image", "resources", "scheduling", "server", "redis")
REVISION_LENGTH = 10


def _normalized(value: Any) -> Any:
    """Drop nulls and empty maps so that `{}` and an absent field hash the same; keep list order (it matters)."""
    if isinstance(value, dict):
        items = {key: _normalized(item) for key, item in value.items() if item is not None}
        return {key: item for key, item in items.items() if item != {}}
    if isinstance(value, list):
        return [_normalized(item) for item in value]
    return value


def pod_spec_fingerprint(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a DeepSeekDeployment spec that the revision hashes."""
    fingerprint = {name: spec.get(name) for name in POD_AFFECTING_FIELDS}
    engine = engine_fingerprint(spec)
    if engine is not None:
        fingerprint["engine"] = engine
    return _normalized(fingerprint)


def compute_revision(spec: dict[str, Any]) -> str:
    """A short hex digest of the pod-affecting spec; equal specs give equal revisions on every run and machine."""
    text = json.dumps(pod_spec_fingerprint(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:REVISION_LENGTH]
