"""The registry's gRPC admin API over real channels, against a nats-server of its own
(so rollouts here never leak into other tests' fleets): apply and its diff, rejection of
invalid files, rollout / promote / rollback and their events, optimistic concurrency,
and 50 concurrent conflicting writers."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from tierflow.contracts import registry, subjects
from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main
from tierflow.services.model_registry.settings import Settings
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1 import registry_pb2_grpc as pb_grpc

FLEET = """
models:
  - name: chat
    description: the chat model
    default_version: v1
    versions:
      - {version: v1, catalog: llama-3.1-8b, configs: [ss8192-bs4, ss4096-bs1]}
      - {version: v2, catalog: llama-3.1-8b, configs: [ss8192-bs4]}
      - {version: v3, catalog: llama-3.1-8b}
  - name: coder
    versions: [{version: v1, catalog: gpt-oss-20b}]
bundles:
  - name: stable
    models: [{model: chat}, {model: coder}]
  - name: canary
    models: [{model: chat, version: v2}]
deployments:
  - {name: stable, bundle: stable, replicas: 2, max_replicas: 4}
  - {name: canary, bundle: canary}
"""


@dataclass
class Registry:
    """A registry running in-process on a private NATS, with a stub and the events it published."""

    nc: NatsClient
    ctx: ServiceContext
    stub: pb_grpc.ModelRegistryStub
    events: list[registry.RegistryEvent] = field(default_factory=list)

    async def settle(self, expect: int = 0) -> list[registry.RegistryEvent]:
        """The events so far: waits (briefly) for `expect` of them, then a little longer
        so that one too many would show."""
        await self.nc.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while len(self.events) < expect and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return list(self.events)

    async def raw(self) -> dict[str, tuple[int, bytes]]:
        """Every live key of the bucket with its revision and bytes, read by the test itself
        (from the stream's subject list, not the registry's own reader)."""
        js = self.nc.jetstream()
        prefix = f"$KV.{subjects.REGISTRY_BUCKET}."
        info = await js.stream_info(f"KV_{subjects.REGISTRY_BUCKET}", subjects_filter=f"{prefix}>")
        kv = await js.key_value(subjects.REGISTRY_BUCKET)
        out = {}
        for subject in sorted(info.state.subjects or {}):
            try:
                entry = await kv.get(subject.removeprefix(prefix))
            except KeyNotFoundError:  # deleted
                continue
            out[entry.key] = (entry.revision or 0, entry.value or b"")
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.ctx.metrics.get_sample_value(name, labels) or 0.0


@pytest_asyncio.fixture(loop_scope="session")
async def private_nats(tmp_path: pathlib.Path) -> AsyncIterator[str]:
    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="registry-admin")
    async with NatsServerProcess(config, tmp_path / "nats.log") as server:
        yield server.url


@asynccontextmanager
async def running_registry(nats_url: str, *, name: str = "test") -> AsyncIterator[Registry]:
    port = free_port()
    ctx = ServiceContext(service="model-registry", instance=name)
    # No admin credential here: these tests are about what calls do (tests/security checks who may call).
    task = asyncio.create_task(main(ctx, Settings(nats_url=nats_url, grpc_port=port, allow_unauthenticated_admin=True)))
    nc = await nats.connect(nats_url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    reg = Registry(nc=nc, ctx=ctx, stub=pb_grpc.ModelRegistryStub(channel))

    async def on_event(msg: Msg) -> None:
        reg.events.append(registry.event_decoder.decode(msg.data))

    await nc.subscribe(subjects.REGISTRY_EVENTS, cb=on_event)
    await nc.flush()
    try:
        for _ in range(250):  # a fresh channel per probe: a failed one backs off for a second
            if task.done():
                task.result()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as probe:
                    await pb_grpc.ModelRegistryStub(probe).ListModels(pb.ListModelsRequest(), timeout=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.02)
        yield reg
    finally:
        ctx.stopping.set()
        await task
        await channel.close()
        await nc.close()


@pytest_asyncio.fixture(loop_scope="session")
async def reg(private_nats: str) -> AsyncIterator[Registry]:
    async with running_registry(private_nats) as running:
        yield running


async def apply(reg: Registry, text: str, **kw: bool) -> pb.ApplyResponse:
    return await reg.stub.Apply(pb.ApplyRequest(fleet_yaml=text, source="fleet.yaml", **kw), timeout=10)


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code(), err.value.details() or ""


# ---------------------------------------------------------------------------- apply


async def test_apply_prints_its_diff_writes_once_and_announces_each_change(reg: Registry) -> None:
    dry = await apply(reg, FLEET, dry_run=True)
    assert dry.dry_run and [(c.kind, c.name, c.op) for c in dry.changes] == [
        ("model", "chat", "create"), ("model", "coder", "create"), ("bundle", "stable", "create"),
        ("bundle", "canary", "create"), ("deployment", "stable", "create"), ("deployment", "canary", "create"),
    ]  # fmt: skip
    assert await reg.raw() == {} and await reg.settle() == []

    first = await apply(reg, FLEET)
    assert not first.problems and {c.op for c in first.changes} == {"create"}
    events = await reg.settle(expect=6)
    assert [(e.kind, e.name, e.op, e.revision) for e in events] == [(c.kind, c.name, "put", c.revision) for c in first.changes]
    assert reg.metric("tierflow_registry_changes_total", kind="model", op="create") == 2
    assert reg.metric("tierflow_registry_changes_total", kind="deployment", op="create") == 2

    before = await reg.raw()
    again = await apply(reg, FLEET)
    assert {c.op for c in again.changes} == {"unchanged"} and await reg.raw() == before and len(await reg.settle(expect=6)) == 6

    changed = await apply(reg, FLEET.replace("replicas: 2, max_replicas: 4", "replicas: 3, max_replicas: 4").replace("the chat model", "chat"))
    updates = [(c.kind, c.name, [(f.field, f.old_json, f.new_json) for f in c.fields]) for c in changed.changes if c.op == "update"]
    assert updates == [("model", "chat", [("description", '"the chat model"', '"chat"')]), ("deployment", "stable", [("replicas", "2", "3")])]
    assert len(await reg.settle(expect=8)) == 8


async def test_an_invalid_file_is_rejected_whole_and_nothing_is_written(reg: Registry) -> None:
    await apply(reg, FLEET)
    before, events = await reg.raw(), len(await reg.settle(expect=6))
    bad = (
        FLEET.replace("replicas: 2, max_replicas: 4", "replicas: 5, max_replicas: 4")  # valid changes elsewhere ...
        .replace("  - name: coder\n", "  - name: fresh\n    versions: [{version: v1, catalog: llama-3.2-1b}]\n  - name: coder\n")
        .replace("{name: canary, bundle: canary}", "{name: canary, bundle: canary, workload: high-interactivity, mode: disaggregated}")
        .replace("{model: chat, version: v2}", "{model: chat, version: v2, config: ss4096-bs1}")
    )
    reply = await apply(reg, bad)
    assert not reply.changes and sorted(p.split(": ")[0] for p in reply.problems) == [
        "$.bundles[1].models[0].config", "$.deployments[0].replicas", "$.deployments[1].mode", "$.deployments[1].prefill_replicas",
    ]  # fmt: skip
    assert all(len(p.split(": ", 1)[1]) > 20 for p in reply.problems)  # each says what is wrong
    assert await reg.raw() == before and len(await reg.settle(expect=events)) == events


async def test_a_file_that_would_break_the_registry_state_is_rejected(reg: Registry) -> None:
    """Valid on its own, but pruning v2 would strand the canary traffic the registry holds."""
    await apply(reg, FLEET)
    await reg.stub.Rollout(pb.RolloutRequest(model="chat", version="v2", weight=10), timeout=5)
    before = await reg.raw()
    no_v2 = FLEET.replace("      - {version: v2, catalog: llama-3.1-8b, configs: [ss8192-bs4]}\n", "").replace(
        "  - name: canary\n    models: [{model: chat, version: v2}]\n", "").replace("  - {name: canary, bundle: canary}\n", "")
    reply = await apply(reg, no_v2, prune=True)
    assert [p.split(": ")[0] for p in reply.problems] == ["$.models[0].traffic"] and "'v2'" in reply.problems[0]
    assert await reg.raw() == before
    await reg.stub.Rollback(pb.RollbackRequest(model="chat"), timeout=5)
    pruned = await apply(reg, no_v2, prune=True)
    assert not pruned.problems
    assert sorted((c.kind, c.name) for c in pruned.changes if c.op == "delete") == [("bundle", "canary"), ("deployment", "canary")]


# ---------------------------------------------------------------------------- traffic


async def test_rollout_promote_and_rollback(reg: Registry) -> None:
    await apply(reg, FLEET)
    kv = await reg.nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
    start = len(await reg.settle(expect=6))

    canary = await reg.stub.Rollout(pb.RolloutRequest(model="chat", version="v2", weight=10), timeout=5)
    assert [(t.version, t.weight) for t in canary.traffic] == [("v1", 90.0), ("v2", 10.0)] and canary.default_version == "v1"
    stored = registry.model_decoder.decode((await kv.get(subjects.model_key("chat"))).value)
    assert stored.traffic == {"v1": 90.0, "v2": 10.0} and (await kv.get(subjects.model_key("chat"))).revision == canary.revision

    cut = await reg.stub.Rollout(pb.RolloutRequest(model="chat", version="v2", weight=100), timeout=5)
    assert [(t.version, t.weight) for t in cut.traffic] == [("v2", 100.0)] and cut.default_version == "v1"

    watcher = await kv.watch(subjects.model_key("chat"))
    loop = asyncio.get_running_loop()
    began = loop.time()
    back = await reg.stub.Rollback(pb.RollbackRequest(model="chat"), timeout=5)
    while True:  # a router watching the bucket sees the rollback well within a second
        entry = await watcher.updates(timeout=1.0)
        if entry is not None and entry.revision == back.revision:
            break
    assert loop.time() - began < 1.0 and registry.model_decoder.decode(entry.value).traffic == {}
    await watcher.stop()
    assert not back.traffic and back.default_version == "v1"

    same = await reg.stub.Rollback(pb.RollbackRequest(model="chat"), timeout=5)  # nothing to roll back: no write
    assert same.revision == back.revision

    promoted = await reg.stub.Promote(pb.PromoteRequest(model="chat", version="v2"), timeout=5)
    assert promoted.default_version == "v2" and not promoted.traffic

    events = (await reg.settle(expect=start + 4))[start:]
    assert [(e.kind, e.name, e.op, e.revision) for e in events] == [
        ("model", "chat", "put", r) for r in (canary.revision, cut.revision, back.revision, promoted.revision)
    ]
    assert reg.metric("tierflow_registry_changes_total", kind="model", op="update") == 4


async def test_bad_requests_get_status_codes_and_messages_a_person_can_act_on(reg: Registry) -> None:
    await apply(reg, FLEET)
    before = await reg.raw()
    s = reg.stub
    code, msg = await code_of(s.Rollout(pb.RolloutRequest(model="nope", version="v2", weight=10), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope' is not registered" in msg
    code, msg = await code_of(s.Rollout(pb.RolloutRequest(model="chat", version="v9", weight=10), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "versions: v1, v2, v3" in msg
    code, msg = await code_of(s.Rollout(pb.RolloutRequest(model="chat", version="v2", weight=150), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "between 0 and 100, got 150" in msg
    code, msg = await code_of(s.Rollout(pb.RolloutRequest(model="", version="v2", weight=5), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model is required" in msg
    code, msg = await code_of(s.Rollout(pb.RolloutRequest(model="chat", version="v3", weight=10), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'v3' would get 10% of the traffic but no deployment serves it" in msg
    code, msg = await code_of(s.Promote(pb.PromoteRequest(model="chat", version="v3"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "registry:model/chat.default_version" in msg
    code, msg = await code_of(s.AddModelVersion(pb.AddModelVersionRequest(model="chat", version=pb.ModelVersion(version="v4", catalog="llama-9")), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "registry:model/chat.versions[v4].catalog" in msg
    code, msg = await code_of(s.AddModelVersion(pb.AddModelVersionRequest(model="chat", version=pb.ModelVersion(version="v1", catalog="gpt-oss-20b")), timeout=5))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, msg = await code_of(s.SetTraffic(pb.SetTrafficRequest(model="chat", traffic=[pb.TrafficWeight(version="v1", weight=0)]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "all be zero" in msg
    assert await reg.raw() == before
    assert reg.metric("tierflow_registry_admin_calls_total", method="Rollout", code="NOT_FOUND") == 2


async def test_expected_revision_guards_against_a_stale_read(reg: Registry) -> None:
    await apply(reg, FLEET)
    model = await reg.stub.GetModel(pb.GetModelRequest(name="chat"), timeout=5)
    added = await reg.stub.AddModelVersion(
        pb.AddModelVersionRequest(model="chat", version=pb.ModelVersion(version="v4", spec_json='{"total_params": 1000000000, "num_layers": 16, "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8, "head_dim": 64, "max_context": 8192}'), expected_revision=model.revision),
        timeout=5,
    )  # fmt: skip
    assert [v.version for v in added.versions] == ["v1", "v2", "v3", "v4"] and added.revision > model.revision
    code, msg = await code_of(reg.stub.SetTraffic(pb.SetTrafficRequest(model="chat", traffic=[pb.TrafficWeight(version="v1", weight=1)], expected_revision=model.revision), timeout=5))
    assert code == grpc.StatusCode.ABORTED and f"at revision {added.revision}, not the expected {model.revision}" in msg


# ---------------------------------------------------------------------------- concurrency


async def test_50_concurrent_version_adds_through_two_registries_lose_nothing(private_nats: str) -> None:
    """Two registry processes' worth of writers race on one model key: every accepted add
    is in the final record, and every one that is not was told so (ABORTED)."""
    async with running_registry(private_nats, name="a") as a, running_registry(private_nats, name="b") as b:
        await apply(a, FLEET)

        async def add(i: int) -> tuple[int, grpc.StatusCode]:
            stub = (a, b)[i % 2].stub
            request = pb.AddModelVersionRequest(model="chat", version=pb.ModelVersion(version=f"c{i}", catalog="llama-3.1-8b"))
            try:
                await stub.AddModelVersion(request, timeout=20)
                return i, grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return i, exc.code()

        results = await asyncio.gather(*(add(i) for i in range(50)))
        final = await a.stub.GetModel(pb.GetModelRequest(name="chat"), timeout=5)
        conflicts = a.metric("tierflow_registry_write_conflicts_total", kind="model") + b.metric("tierflow_registry_write_conflicts_total", kind="model")
    accepted = {f"c{i}" for i, code in results if code == grpc.StatusCode.OK}
    assert {code for _, code in results} <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}
    assert {v.version for v in final.versions} == {"v1", "v2", "v3"} | accepted
    assert len(accepted) >= 25, (len(accepted), conflicts)  # retries on fresh state make most of them land


async def test_50_concurrent_rollouts_from_one_read_let_exactly_one_win(reg: Registry) -> None:
    await apply(reg, FLEET)
    model = await reg.stub.GetModel(pb.GetModelRequest(name="chat"), timeout=5)

    async def rollout(weight: int) -> tuple[int, grpc.StatusCode, str]:
        try:
            await reg.stub.Rollout(pb.RolloutRequest(model="chat", version="v2", weight=weight, expected_revision=model.revision), timeout=10)
            return weight, grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return weight, exc.code(), exc.details() or ""

    results = await asyncio.gather(*(rollout(w) for w in range(1, 51)))
    winners = [w for w, code, _ in results if code == grpc.StatusCode.OK]
    assert len(winners) == 1
    assert all(code == grpc.StatusCode.ABORTED and "not the expected" in msg for _, code, msg in results if code != grpc.StatusCode.OK)
    final = await reg.stub.GetModel(pb.GetModelRequest(name="chat"), timeout=5)
    assert {t.version: t.weight for t in final.traffic} == {"v1": 100.0 - winners[0], "v2": float(winners[0])}


# ---------------------------------------------------------------------------- observability


async def test_one_structured_log_record_per_admin_call(reg: Registry, caplog: pytest.LogCaptureFixture) -> None:
    await apply(reg, FLEET)
    caplog.set_level(logging.INFO, logger="tierflow.services.model_registry.grpc_api")
    caplog.clear()
    await reg.stub.Rollout(pb.RolloutRequest(model="chat", version="v2", weight=25), timeout=5)
    await code_of(reg.stub.Rollback(pb.RollbackRequest(model="ghost"), timeout=5))
    records = [getattr(r, "fields", {}) for r in caplog.records if r.name == "tierflow.services.model_registry.grpc_api"]
    assert [(f["method"], f["code"]) for f in records] == [("Rollout", "OK"), ("Rollback", "NOT_FOUND")]
    assert records[0]["model"] == "chat" and records[0]["weight"] == 25 and records[0]["op"] == "update" and "duration_ms" in records[0]
    assert "'ghost' is not registered" in records[1]["error"]
