"""A starting router opens its ports only once it knows the registry's catalog.

With --reuse-port a restarted router takes connections from its peers' clients the
moment it listens; before its registry watch has caught up it could only say "model
does not exist" (a 404 for a model that is deployed), so it waits for the catalog."""

from __future__ import annotations

import asyncio
import pathlib

import nats
import openai

from tierflow.contracts import subjects
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings
from tierflow.services.router.main import main as router_main
from tierflow.services.router.settings import Settings as RouterSettings

REPO = pathlib.Path(__file__).resolve().parents[2]


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def _router(url: str, http_port: int) -> tuple[ServiceContext, asyncio.Task[None]]:
    ctx = ServiceContext(service="router", instance="ready")
    settings = RouterSettings(nats_url=url, http_port=http_port, grpc_port=free_port(), allow_anonymous=True, ready_wait=60)
    return ctx, asyncio.create_task(router_main(ctx, settings))


async def test_the_router_listens_only_once_it_knows_the_catalog(private_nats_url: str) -> None:
    # No registry, so no catalog: connected to NATS long since, the router keeps its port shut.
    http_port = free_port()
    ctx, router = _router(private_nats_url, http_port)
    try:
        await asyncio.sleep(1.5)
        assert not router.done() and not await _listening(http_port)
    finally:
        ctx.stopping.set()
        await asyncio.gather(router, return_exceptions=True)

    # With the catalog in the registry (a router restarting beside its peers): its first answer knows it.
    registry_ctx = ServiceContext(service="model-registry", instance="ready")
    registry = asyncio.create_task(registry_main(registry_ctx, RegistrySettings(nats_url=private_nats_url, grpc_port=free_port(),
                                                                                fleet=str(REPO / "deploy/examples/fleet.yaml"))))  # fmt: skip
    nc = await nats.connect(private_nats_url)
    ctx, router = _router(private_nats_url, http_port := free_port())
    try:
        async with asyncio.timeout(20):
            while not await _fleet_written(nc):
                await asyncio.sleep(0.05)
            ctx.stopping.set()  # the router that started with the empty bucket goes; a new one comes
            await asyncio.gather(router, return_exceptions=True)
            ctx, router = _router(private_nats_url, http_port)
            while not await _listening(http_port):
                await asyncio.sleep(0.01)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="k", max_retries=0)
        assert len((await client.models.list()).data) >= 1
    finally:
        ctx.stopping.set()
        registry_ctx.stopping.set()
        await asyncio.gather(router, registry, return_exceptions=True)
        await nc.close()


async def _fleet_written(nc: nats.NATS) -> bool:
    try:
        kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
        return bool([k for k in await kv.keys() if k.startswith("deployment.")])
    except Exception:  # no bucket yet, no keys yet
        return False
