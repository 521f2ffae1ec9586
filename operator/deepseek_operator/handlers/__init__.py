"""Thin kopf wiring: one reconcile per kind, a finalizer on ApiKeys, the schedule loop, login, a probe."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import kopf

from ..kube import load_connection
from ..leader_election import in_cluster_namespace
from ..runtime import OperatorRuntime
from ..scheduling import run_schedule
from . import apikey, deployment

KOPF_CONNECTIONS = 16


def build_registry(runtime: OperatorRuntime) -> kopf.OperatorRegistry:
    """A registry with every handler bound to `runtime`."""
    registry = kopf.OperatorRegistry()
    apikey.register(registry, runtime)
    deployment.register(registry, runtime)
    tasks: list[asyncio.Task[None]] = []

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.AiohttpSession:
        # From where the operator's own client connects (kube.load_connection): --kubeconfig, $KUBECONFIG,
        # ~/.kube/config, else the in-cluster service account. kopf's own login handlers never read --kubeconfig
        # and try the service account first, so kopf could watch another cluster than the one the operator writes.
        connection = await asyncio.to_thread(load_connection, runtime.settings.kubeconfig)
        token = await asyncio.to_thread(connection.token)
        # kopf's own session opens a new TLS connection for every concurrent patch (no connection limit); a
        # bounded pool reuses connections, which under a thousand new keys saves most of kopf's CPU on handshakes.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=connection.ssl_context),
            headers={"Authorization": token} if token else {},
        )
        return kopf.AiohttpSession(server=connection.host, default_namespace=in_cluster_namespace(),
                                   aiohttp_session=session)

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
