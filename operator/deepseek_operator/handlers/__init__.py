"""Thin kopf wiring: one reconcile per kind, a finalizer on ApiKeys, the schedule loop, login, a probe."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from ..runtime import OperatorRuntime
from ..scheduling import run_schedule
from . import apikey, deployment

KOPF_CONNECTIONS = 16


def in_cluster_service_account(info: kopf.ConnectionInfo | None,
                               environ: Mapping[str, str]) -> kopf.ConnectionInfo | None:
    """kopf's service-account login, pointed where client-go points: $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.

    kopf assumes `https://kubernetes.default.svc` (cluster DNS, port 443); not every cluster resolves that name from
    a pod, while the kubelet always sets the two variables.
    """
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if info is None or not host or not port:
        return info
    if ":" in host:
        host = f"[{host}]"
    return dataclasses.replace(info, server=f"https://{host}:{port}")


def build_registry(runtime: OperatorRuntime) -> kopf.OperatorRegistry:
    """A registry with every handler bound to `runtime`."""
    registry = kopf.OperatorRegistry()
    apikey.register(registry, runtime)
    deployment.register(registry, runtime)
    tasks: list[asyncio.Task[None]] = []

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        info = in_cluster_service_account(kopf.login_with_service_account(**kwargs), os.environ)
        info = info or kopf.login_with_kubeconfig(**kwargs)
        if info is None:
            return None
        # kopf's own session opens a new TLS connection for every concurrent patch (no connection limit); a
        # bounded pool reuses connections, which under a thousand new keys saves most of kopf's CPU on handshakes.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
            headers=info.as_http_headers(),
        )
        return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                                   expiration=info.expiration, aiohttp_session=session)

    @kopf.on.startup(registry=registry)
    async def start_schedule(**_: Any) -> None:
        tasks.append(asyncio.create_task(run_schedule(runtime.schedule, runtime.dispatch), name="schedule"))

    @kopf.on.cleanup(registry=registry)
    async def stop_schedule(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        runtime.close()

    @kopf.on.probe(id="scheduled", registry=registry)
    def scheduled(**_: Any) -> int:
        return len(runtime.schedule)

    return registry
