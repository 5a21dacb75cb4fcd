"""The model-registry service against a real nats-server: apply, persist, re-apply, serve gRPC."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest

from tierflow.contracts import registry, subjects
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main
from tierflow.services.model_registry.settings import Settings
from tierflow.v1 import registry_pb2, registry_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[2]


async def _run_registry(nats_url: str, fleet: str, port: int) -> tuple[ServiceContext, asyncio.Task[None]]:
    ctx = ServiceContext(service="model-registry", instance="test")
    task = asyncio.create_task(main(ctx, Settings(nats_url=nats_url, grpc_port=port, fleet=fleet)))
    for _ in range(100):
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await registry_pb2_grpc.ModelRegistryStub(ch).ListModels(registry_pb2.ListModelsRequest(), timeout=1)
            return ctx, task
        except grpc.aio.AioRpcError:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
    raise AssertionError("registry did not start")


async def test_apply_is_durable_and_idempotent(nats_url: str, nats_client) -> None:
    events: list[registry.RegistryEvent] = []

    async def on_event(msg) -> None:
        events.append(registry.event_decoder.decode(msg.data))

    await nats_client.subscribe(subjects.REGISTRY_EVENTS, cb=on_event)
    await nats_client.flush()
    fleet = str(REPO / "deploy/examples/fleet.yaml")
    port = free_port()

    ctx, task = await _run_registry(nats_url, fleet, port)
    ctx.stopping.set()
    await task
    await nats_client.flush()
    first_round = len(events)

    kv = await nats_client.jetstream().key_value(subjects.REGISTRY_BUCKET)
    record = registry.deployment_decoder.decode((await kv.get(subjects.deployment_key("default"))).value)
    assert record.replicas == 2 and [e.model for e in record.models] == ["llama-3.1-8b", "gpt-oss-20b"]
    revision = (await kv.get(subjects.model_key("llama-3.1-8b"))).revision

    # A restarted registry applying the same file changes nothing and announces nothing.
    ctx, task = await _run_registry(nats_url, fleet, port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        models = (await registry_pb2_grpc.ModelRegistryStub(ch).ListModels(registry_pb2.ListModelsRequest(), timeout=2)).models
    ctx.stopping.set()
    await task
    assert sorted(m.name for m in models) == ["gpt-oss-20b", "llama-3.1-8b"]
    assert (await kv.get(subjects.model_key("llama-3.1-8b"))).revision == revision
    await nats_client.flush()
    assert len(events) == first_round


async def test_invalid_fleet_stops_the_service_with_every_problem(nats_url: str, tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("models: [{name: a, versions: [{version: v1}]}]\nbundles: [{name: b, models: [{model: zz}]}]\ndeployments: [{name: d, bundle: q}]\n")
    ctx = ServiceContext(service="model-registry", instance="test")
    with pytest.raises(ValueError) as err:
        await main(ctx, Settings(nats_url=nats_url, grpc_port=free_port(), fleet=str(bad)))
    assert "$.bundles[0].models[0].model" in str(err.value) and "$.deployments[0].bundle" in str(err.value)
