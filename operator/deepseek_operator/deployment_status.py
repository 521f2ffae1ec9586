"""The DeepSeekDeployment status fields the issuer owns (pure). The rollout adds its own fields and conditions."""

from __future__ import annotations

from typing import Any

from .auth_config import CONFIGMAP_LIMIT, NEW_ENTRY_BUDGET
from .auth_store import full_message
from .conditions import Condition, merge_conditions


def auth_config_condition(configmap: str, size: int | None) -> Condition:
    """`AuthConfigFull`: True once the auth ConfigMap is past the size where new keys wait (docs/auth-contract.md)."""
    if size is None:
        return Condition("AuthConfigFull", None, "Unknown", f"the size of ConfigMap {configmap} is not known yet")
    if size > NEW_ENTRY_BUDGET:
        return Condition("AuthConfigFull", True, "NewKeysWait", full_message(configmap, size))
    return Condition("AuthConfigFull", False, "HasRoom",
                     f"ConfigMap {configmap} holds {size / 1024:.0f} KiB of its {CONFIGMAP_LIMIT // 1024} KiB cap; "
                     f"new keys wait past {NEW_ENTRY_BUDGET // 1024} KiB")


def issuer_status(
    previous: dict[str, Any] | None, *, ready: bool, reason: str, message: str, signing_key_id: str | None,
    auth_configmap: str, generation: int, now: str, auth_config_size: int | None = None,
) -> dict[str, Any]:
    """Status with the `IssuerReady` and `AuthConfigFull` conditions, `signingKeyId` and `authConfigMap` set; other
    fields kept."""
    status = dict(previous or {})
    status["conditions"] = merge_conditions(
        status.get("conditions"), [Condition("IssuerReady", ready, reason, message),
                                   auth_config_condition(auth_configmap, auth_config_size)],
        now=now, generation=generation, keep_others=True,
    )
    if signing_key_id:
        status["signingKeyId"] = signing_key_id
    status["authConfigMap"] = auth_configmap
    return status


def conflict_condition(previous: list[dict[str, Any]] | None, conflicts: list[str]) -> Condition | None:
    """`Conflict`: True naming each object whose name the deployment needs and does not own (with what to do),
    False once none is left; None when nothing changes (no conflict now, and none was ever reported)."""
    before = next((c for c in previous or [] if c.get("type") == "Conflict"), None)
    if conflicts:
        wanted = Condition("Conflict", True, "NotOwned",
                           "; ".join(conflicts) + ". The operator leaves it untouched and never takes over an object "
                           "it did not create: delete or rename it so that this DeepSeekDeployment can create its "
                           "own, or give the DeepSeekDeployment another name")
    elif before is None:
        return None
    else:
        wanted = Condition("Conflict", False, "Resolved", "every child name is free or owned by this deployment")
    if before is not None and (before.get("status"), before.get("reason"), before.get("message")) == (
            wanted.status_text, wanted.reason, wanted.message):
        return None
    return wanted
