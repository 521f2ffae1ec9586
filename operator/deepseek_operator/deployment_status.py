"""The DeepSeekDeployment status fields the issuer owns (pure). The rollout adds its own fields and conditions."""

from __future__ import annotations

from typing import Any

from .conditions import Condition, merge_conditions


def issuer_status(
    previous: dict[str, Any] | None, *, ready: bool, reason: str, message: str, signing_key_id: str | None,
    auth_configmap: str, generation: int, now: str,
) -> dict[str, Any]:
    """Status with the `IssuerReady` condition, `signingKeyId` and `authConfigMap` set; other fields kept."""
    status = dict(previous or {})
    status["conditions"] = merge_conditions(
        status.get("conditions"), [Condition("IssuerReady", ready, reason, message)],
        now=now, generation=generation, keep_others=True,
    )
    if signing_key_id:
        status["signingKeyId"] = signing_key_id
    status["authConfigMap"] = auth_configmap
    return status
