"""DeepSeekDeployment handlers: every change runs the reconcile (issuer today, pods and rollout later).

No deletion handler and no kopf timer, hence no finalizer: owner references remove the children, and the
operator's own schedule brings the reconcile back for key rotation and drift checks.
"""

from __future__ import annotations

from typing import Any

import kopf

from ..names import GROUP, VERSION
from ..runtime import OperatorRuntime

PLURAL = "deepseekdeployments"


def register(registry: kopf.OperatorRegistry, runtime: OperatorRuntime) -> None:
    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    async def deployment_changed(namespace: str | None, name: str, **_: Any) -> None:
        await runtime.reconcile_deployment(str(namespace), name, wake_keys=True)
