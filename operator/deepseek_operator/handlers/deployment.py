"""DeepSeekDeployment handlers: every change runs the reconcile (issuer today, pods and rollout later).

No deletion handler and no kopf timer, hence no finalizer: owner references remove the children, and the
operator's own schedule brings the reconcile back for key rotation and drift checks. The one child in another
namespace, the signing-key Secret in the operator's own, is deleted when the watch reports the deletion, and a sweep
(at startup, then every issuer check interval) deletes any left by a deletion no operator saw.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from typing import Any

import kopf

from ..kube import KubeError
from ..names import GROUP, VERSION
from ..runtime import OperatorRuntime

log = logging.getLogger(__name__)

PLURAL = "deepseekdeployments"


def auth_spec_changed(diff: Iterable[Any]) -> bool:
    """Whether an update's diff (kopf's `(op, field, old, new)` entries) touches `spec.auth` (pure).

    The keys' default scopes live there; the signing keys and default limits reach the ApiKeys through the issuer
    reconcile, which wakes them itself when those change. Any other edit (image, replicas, rollout) leaves every
    ApiKey of the deployment as it is, so it wakes none of them."""
    for _op, field, old, new in diff:
        path = tuple(field)
        if path[:2] == ("spec", "auth"):
            return True
        if path in ((), ("spec",)):  # the whole body or spec added, removed or replaced: look inside
            def auth(value: Any, path: tuple[str, ...] = path) -> Any:
                spec = ((value or {}).get("spec") if path == () else value) or {}
                return spec.get("auth")
            if auth(old) != auth(new):
                return True
    return False


def register(registry: kopf.OperatorRegistry, runtime: OperatorRuntime) -> None:
    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    async def deployment_appeared(namespace: str | None, name: str, **_: Any) -> None:
        # Keys made before their deployment wait for it: wake them (only them: after a restart, thousands of Ready
        # keys were just verified from the start-up listing, and a changed issuer wakes its keys anyway).
        await runtime.reconcile_deployment(str(namespace), name, wake_waiting_keys=True)

    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    async def deployment_changed(namespace: str | None, name: str, diff: kopf.Diff, **_: Any) -> None:
        await runtime.reconcile_deployment(str(namespace), name, wake_keys=auth_spec_changed(diff))

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def deployment_event(type: str | None, namespace: str | None, name: str | None, uid: str | None,
                               **_: Any) -> None:
        if type != "DELETED" or not uid:
            return
        runtime.deployments.forget(str(namespace), str(name))
        try:
            await asyncio.to_thread(runtime.issuers.forget_deployment, str(namespace), str(name), uid)
        except KubeError as exc:
            # The sweep deletes it later; the keys are in the operator's namespace, out of tenants' reach meanwhile.
            log.warning("signing keys of deleted deployment %s/%s not deleted yet (%s)", namespace, name, exc)
        finally:
            runtime.deployment_deleted(str(namespace), str(name))  # once its cached object is dropped

    sweeps: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry)
    async def prepare_signing_keys(**_: Any) -> None:
        store = runtime.issuers.signing_keys
        # In a pod (the kubelet sets KUBERNETES_SERVICE_HOST) the namespace exists and may not be created.
        await asyncio.to_thread(store.prepare, create_namespace="KUBERNETES_SERVICE_HOST" not in os.environ)
        sweeps.append(asyncio.create_task(sweep_signing_keys(runtime), name="signing-key-sweep"))

    @kopf.on.cleanup(registry=registry)
    async def stop_signing_key_sweep(**_: Any) -> None:
        for task in sweeps:
            task.cancel()
        await asyncio.gather(*sweeps, return_exceptions=True)


async def sweep_signing_keys(runtime: OperatorRuntime) -> None:
    """Delete orphaned signing-key Secrets now and every issuer check interval."""
    while True:
        try:
            await asyncio.to_thread(runtime.issuers.signing_keys.sweep)
        except Exception as exc:  # the API unreachable too: the loop must outlive it
            log.warning("signing-key sweep failed (%s); trying again in %.0fs", exc,
                        runtime.settings.issuer_check_interval)
        await asyncio.sleep(runtime.settings.issuer_check_interval)
