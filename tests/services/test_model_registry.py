"""The model-registry service against a real nats-server: apply, persist, re-apply, serve gRPC."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import nats
from nats.aio.msg import Msg
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
    # No admin credential: these tests are about state and outages (tests/security checks who may write).
    task = asyncio.create_task(main(ctx, Settings(nats_url=nats_url, grpc_port=port, fleet=fleet, allow_unauthenticated_admin=True)))
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


async def _entities(port: int) -> tuple[list[registry_pb2.Model], list[registry_pb2.Bundle], list[registry_pb2.Deployment]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = registry_pb2_grpc.ModelRegistryStub(ch)
        models = (await stub.ListModels(registry_pb2.ListModelsRequest(), timeout=5)).models
        bundles = (await stub.ListBundles(registry_pb2.ListBundlesRequest(), timeout=5)).bundles
        deployments = (await stub.ListDeployments(registry_pb2.ListDeploymentsRequest(), timeout=5)).deployments
    return list(models), list(bundles), list(deployments)


async def test_everything_survives_a_restart_of_the_registry_and_of_nats(tmp_path: pathlib.Path) -> None:
    """Apply, stop the registry and the NATS server, start both again (same store dir and
    port): every entity is there at its old revision, and applying again changes nothing
    and announces nothing."""
    from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess

    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="registry-restart")
    fleet = str(REPO / "deploy/examples/fleet.yaml")
    port = free_port()

    async with NatsServerProcess(config, tmp_path / "nats-1.log") as server:
        ctx, task = await _run_registry(server.url, fleet, port)
        before = await _entities(port)
        ctx.stopping.set()
        await task
    assert [m.name for m in before[0]] == ["gpt-oss-20b", "llama-3.1-8b"]
    assert [b.name for b in before[1]] == ["agents"] and [d.name for d in before[2]] == ["default"]

    async with NatsServerProcess(config, tmp_path / "nats-2.log") as server:
        nc = await nats.connect(server.url)
        events: list[bytes] = []

        async def on_event(msg: Msg) -> None:
            events.append(msg.data)

        await nc.subscribe(subjects.REGISTRY_EVENTS, cb=on_event)
        await nc.flush()
        ctx, task = await _run_registry(server.url, fleet, port)  # applies the same file at start
        try:
            after = await _entities(port)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                reply = await registry_pb2_grpc.ModelRegistryStub(ch).Apply(
                    registry_pb2.ApplyRequest(fleet_yaml=pathlib.Path(fleet).read_text()), timeout=5
                )
        finally:
            ctx.stopping.set()
            await task
        await nc.flush()
        await nc.close()
    assert after == before  # same records, same revisions
    assert not reply.problems and {c.op for c in reply.changes} == {"unchanged"} and len(reply.changes) == 4
    assert events == []


async def test_the_registry_rides_out_a_nats_restart(tmp_path: pathlib.Path) -> None:
    """NATS restarts under a running registry: once it is back, admin writes work again."""
    from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess

    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="registry-ride")
    port = free_port()
    server = NatsServerProcess(config, tmp_path / "nats-1.log")
    await server.start()
    await server.wait_ready()
    ctx, task = await _run_registry(server.url, str(REPO / "deploy/examples/fleet.yaml"), port)
    try:
        await server.stop()
        server = NatsServerProcess(config, tmp_path / "nats-2.log")
        await server.start()
        await server.wait_ready()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = registry_pb2_grpc.ModelRegistryStub(ch)
            while True:
                try:
                    model = await stub.SetTraffic(registry_pb2.SetTrafficRequest(model="llama-3.1-8b", traffic=[registry_pb2.TrafficWeight(version="v1", weight=1)]), timeout=2)
                    break
                except grpc.aio.AioRpcError:
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            assert [(t.version, t.weight) for t in model.traffic] == [("v1", 1.0)]
            assert (await stub.GetModel(registry_pb2.GetModelRequest(name="llama-3.1-8b"), timeout=2)).revision == model.revision
    finally:
        ctx.stopping.set()
        await task
        await server.stop()
