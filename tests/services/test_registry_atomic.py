"""Registry applies are atomic for everyone who follows the bucket.

A real registry process (`python -m tierflow model-registry`) applies fleets A and B in
turn and is SIGKILLed at random moments, restarted, and driven on; a reader following
the bucket with the real `runtime.kv.follow` checks, after every group of changes and from
another task woken by every single change, that it holds fleet A, fleet B or nothing,
never a mix. Also: an apply larger than one batch is refused whole, and a registry whose
NATS is down answers UNAVAILABLE and serves again once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import random
import signal
import sys

import grpc
import nats
import pytest
from prometheus_client import CollectorRegistry

from tierflow.contracts import registry, subjects
from tierflow.runtime.clock import WallClock
from tierflow.runtime.kv import follow, open_bucket, snapshot
from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.errors import FailedPrecondition
from tierflow.services.model_registry.main import main
from tierflow.services.model_registry.metrics import RegistryMetrics
from tierflow.services.model_registry.service import RegistryService
from tierflow.services.model_registry.settings import Settings
from tierflow.services.model_registry.store import RegistryStore
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1 import registry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SHARED = [f"m{i:02}" for i in range(40)]


def fleet(name: str) -> str:
    """40 models both fleets share (their description names the fleet), 10 of its own, and
    its own bundle and deployment: applying one over the other (pruned) rewrites 40 keys,
    deletes 12 and creates 12, in one apply."""
    own = [f"{name}{i:02}" for i in range(10)]
    models = "\n".join(f"  - {{name: {m}, description: fleet-{name}, versions: [{{version: v1, catalog: llama-3.1-8b}}]}}" for m in SHARED + own)
    return (
        f"models:\n{models}\n"
        f"bundles:\n  - {{name: bundle-{name}, models: [{{model: {own[0]}}}]}}\n"
        f"deployments:\n  - {{name: dep-{name}, bundle: bundle-{name}, replicas: 1}}\n"
    )


def keys_of(name: str) -> set[str]:
    return {f"model.{m}" for m in SHARED} | {f"model.{name}{i:02}" for i in range(10)} | {f"bundle.bundle-{name}", f"deployment.dep-{name}"}


FLEETS = {"a": keys_of("a"), "b": keys_of("b")}


def which_fleet(view: dict[str, bytes]) -> str | None:
    """The fleet `view` is exactly ("" for nothing at all); None for anything else: a mix."""
    if not view:
        return ""
    for name, keys in FLEETS.items():
        if set(view) == keys and all(
            registry.model_decoder.decode(v).description == f"fleet-{name}" for k, v in view.items() if k.startswith("model.")
        ):
            return name
    return None


class Reader:
    """Follows the registry bucket and checks the invariant after every change group and
    from a task woken by every single change (it would run between two changes of a group
    if `follow` ever yielded to the loop inside one)."""

    def __init__(self) -> None:
        self.view: dict[str, bytes] = {}
        self.mixed: list[list[str]] = []
        self.seen: list[str] = []
        self.woken = asyncio.Event()
        self.synced = asyncio.Event()

    def on_put(self, key: str, value: bytes, revision: int) -> None:
        self.view[key] = value
        self.woken.set()

    def on_delete(self, key: str) -> None:
        self.view.pop(key, None)
        self.woken.set()

    def check(self) -> None:
        name = which_fleet(self.view)
        if name is None:
            self.mixed.append(sorted(self.view))
        elif not self.seen or self.seen[-1] != name:
            self.seen.append(name)

    async def watchdog(self) -> None:
        while True:
            await self.woken.wait()
            self.woken.clear()
            self.check()

    async def until(self, name: str, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while which_fleet(self.view) != name:
                await asyncio.sleep(0.02)


class RegistryProcess:
    """`python -m tierflow model-registry` as a child process, killed and started at will."""

    def __init__(self, nats_url: str, log_path: pathlib.Path) -> None:
        self.nats_url = nats_url
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        self.port = free_port()
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tierflow", "model-registry", "--nats-url", self.nats_url, "--grpc-port", str(self.port),
                "--allow-unauthenticated-admin", "--log-level", "warning", stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        async with asyncio.timeout(60):
            while True:
                assert self.proc.returncode is None, f"registry exited with {self.proc.returncode}; see {self.log_path}"
                try:
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
                        await pb_grpc.ModelRegistryStub(ch).ListModels(pb.ListModelsRequest(), timeout=1)
                    return
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def apply_in_turn(port: int, first: str, applied: list[str]) -> None:
    """Apply the fleets alternately until the registry stops answering."""
    name = first
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ModelRegistryStub(ch)
        while True:
            reply = await stub.Apply(pb.ApplyRequest(fleet_yaml=fleet(name), prune=True, source=f"fleet-{name}"), timeout=20)
            assert not reply.problems, reply.problems
            applied.append(name)
            name = "b" if name == "a" else "a"


async def test_a_registry_killed_at_random_moments_never_shows_a_mixed_fleet(tmp_path: pathlib.Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    log.info("seed %d", seed)
    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="registry-atomic")
    async with NatsServerProcess(config, tmp_path / "nats.log") as server:
        nc = await nats.connect(server.url)
        stopping = asyncio.Event()
        reader = Reader()
        proc = RegistryProcess(server.url, tmp_path / "registry.log")
        tasks: list[asyncio.Task[None]] = []
        try:
            await proc.start()  # it makes the bucket
            tasks.append(asyncio.create_task(follow(nc.jetstream(), subjects.REGISTRY_BUCKET, ">", on_put=reader.on_put,
                                                    on_delete=reader.on_delete, on_snapshot=reader.synced.set,
                                                    on_applied=reader.check, stopping=stopping)))  # fmt: skip
            tasks.append(asyncio.create_task(reader.watchdog()))
            await asyncio.wait_for(reader.synced.wait(), 20)
            applied: list[str] = []
            await apply_in_turn_once(proc.port, "a", applied)
            await reader.until("a")

            kills = 0
            next_fleet = "b"
            while kills < 8:
                driver = asyncio.create_task(apply_in_turn(proc.port, next_fleet, applied))
                await asyncio.sleep(rng.uniform(0.05, 1.5))  # the random moment of the kill
                await proc.kill()
                kills += 1
                with pytest.raises((grpc.aio.AioRpcError, AssertionError)):
                    await asyncio.wait_for(driver, 30)
                next_fleet = rng.choice("ab")
                await proc.start()

            # The bucket holds one whole fleet, and the reader converges to it.
            entries = await snapshot(nc.jetstream(), subjects.REGISTRY_BUCKET)
            final = which_fleet({e.key: e.value for e in entries})
            assert final in ("a", "b"), f"the bucket holds a mixed fleet: {sorted(e.key for e in entries)} (seed {seed})"
            await reader.until(final)
            assert reader.mixed == [], f"a reader saw a mixed fleet (seed {seed}): {reader.mixed[:2]}"
            assert len(applied) >= 3 and len(reader.seen) >= 3, (applied, reader.seen)  # it did switch fleets, several times
        finally:
            stopping.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await proc.kill()
            await nc.close()


async def apply_in_turn_once(port: int, name: str, applied: list[str]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await pb_grpc.ModelRegistryStub(ch).Apply(pb.ApplyRequest(fleet_yaml=fleet(name), prune=True), timeout=20)
    assert not reply.problems, reply.problems
    applied.append(name)


# ---------------------------------------------------------------------------- limits, outages


async def test_an_apply_larger_than_one_batch_is_refused_whole(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        bucket = f"registry-{random.randrange(1 << 30):x}"
        kv = await open_bucket(js, bucket, create=True, atomic=True)

        async def publish(event: registry.RegistryEvent) -> None:
            pass

        service = RegistryService(RegistryStore(js, kv, bucket, max_batch=20), publish, WallClock(), RegistryMetrics(CollectorRegistry()))
        with pytest.raises(FailedPrecondition, match=r"this apply changes 52 records.*at most 20 messages.*split the fleet file"):
            await service.apply(fleet("a"))
        assert await snapshot(js, bucket) == []
    finally:
        await nc.close()


async def test_a_registry_without_nats_answers_unavailable_and_serves_again(tmp_path: pathlib.Path) -> None:
    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="registry-outage")
    server = NatsServerProcess(config, tmp_path / "nats-1.log")
    await server.start()
    await server.wait_ready()
    port = free_port()
    ctx = ServiceContext(service="model-registry", instance="outage")
    task = asyncio.create_task(main(ctx, Settings(nats_url=server.url, grpc_port=port, allow_unauthenticated_admin=True)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ModelRegistryStub(ch)
            async with asyncio.timeout(30):
                while True:
                    try:
                        await stub.Apply(pb.ApplyRequest(fleet_yaml=fleet("a")), timeout=10)
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.05)
            await server.stop()
            for call in (stub.ListModels(pb.ListModelsRequest(), timeout=10), stub.Apply(pb.ApplyRequest(fleet_yaml=fleet("b"), prune=True), timeout=10)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                assert "NATS is disconnected" in (err.value.details() or "") and "retry" in (err.value.details() or "")
            assert not task.done()

            server = NatsServerProcess(config, tmp_path / "nats-2.log")
            await server.start()
            await server.wait_ready()
            async with asyncio.timeout(30):
                while True:
                    try:
                        reply = await stub.Apply(pb.ApplyRequest(fleet_yaml=fleet("b"), prune=True), timeout=10)
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        await asyncio.sleep(0.1)
            assert {c.op for c in reply.changes} == {"update", "create", "delete"}
            models = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
            assert {m.description for m in models} == {"fleet-b"}
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 30)
        await server.stop()

