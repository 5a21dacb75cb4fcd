"""The model-registry service: owns models, versions, bundles and deployments.

On start it applies the fleet file it was given (idempotent: unchanged records are not
rewritten), then serves the gRPC admin API. State lives in JetStream KV, never here,
so the process can be killed and restarted at will.
"""

from __future__ import annotations

import logging

import msgspec

from tierflow.contracts import registry, subjects
from tierflow.runtime import discovery
from tierflow.runtime.kv import open_bucket
from tierflow.runtime.service import ServiceContext, connect_nats
from tierflow.services.model_registry.fleet import load_fleet, to_records
from tierflow.services.model_registry.grpc_api import start_grpc
from tierflow.services.model_registry.settings import Settings
from tierflow.services.model_registry.store import Change, RegistryStore

__all__ = ["Settings", "main"]

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode



async def apply_records(store: RegistryStore, nc: object, models: list[registry.ModelRecord], deployments: list[registry.DeploymentRecord]) -> list[Change]:
    changes = [await store.put_model(m) for m in models] + [await store.put_deployment(d) for d in deployments]
    for change in changes:
        if change.op != "unchanged":
            event = registry.RegistryEvent(kind=change.kind, name=change.name, op="put", revision=change.revision)
            await nc.publish(subjects.REGISTRY_EVENTS, _encode(event))  # type: ignore[attr-defined]
    return changes


async def main(ctx: ServiceContext, settings: Settings) -> None:
    nc = await connect_nats(settings.nats_url, "tierflow-model-registry", stopping=ctx.stopping)
    js = nc.jetstream()
    store = RegistryStore(await open_bucket(js, subjects.REGISTRY_BUCKET, create=True))
    if settings.fleet:
        fleet = load_fleet(settings.fleet)  # a bad file stops the service with every problem listed
        changes = await apply_records(store, nc, *to_records(fleet))
        summary = {op: sum(c.op == op for c in changes) for op in ("create", "update", "unchanged")}
        log.info("applied fleet %s", settings.fleet, extra={"fields": summary})
    server = await start_grpc(store, settings.grpc_host, settings.grpc_port)
    micro = await discovery.register(nc, "model-registry", ctx.instance, grpc=f"{settings.grpc_host}:{settings.grpc_port}")
    log.info("model registry serving gRPC on %s:%d", settings.grpc_host, settings.grpc_port)
    await ctx.stopping.wait()
    await server.stop(grace=2.0)
    await micro.stop()
    await nc.drain()
