"""Scale-downs that survive the autoscaler: removal records in JetStream KV (a real
nats-server), the policy on a VirtualClock, nodes' control endpoints as FakeNodes on NATS.

What a restarted (or newly active) autoscaler does with the records it finds is decided
in its first tick: finished or undone by the policy, dropped when the node is gone or no
longer the autoscaler's, and nothing at all for cordons it has no record of.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages, registry, subjects
from tierflow.contracts.autoscaler import AUTOSCALER_OWNER, OPERATOR_OWNER, Removal, removal_decoder
from tierflow.runtime.clock import VirtualClock
from tierflow.scaling import ScalingConfig
from tierflow.scaling.fleet import FleetView
from tierflow.services.autoscaler.actuators import VirtualActuator
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.node_control import NatsNodeControl
from tierflow.services.autoscaler.removals import KvRemovalBook, RemovalConflict, open_autoscaler_bucket
from tierflow.services.autoscaler.scaler import Autoscaler

from autoscaler_fakes import FakeNode

CONFIG = ScalingConfig(panic_window=0.0, stable_window=60.0, cooldown_up=0.0, cooldown_down=0.0, max_signal_age=5.0)


@dataclass
class Gate:
    """A lease the test holds or takes away."""

    holder: str
    term: int
    open: bool = True

    def may_act(self) -> bool:
        return self.open


@dataclass
class Env:
    nc: NATS
    book: KvRemovalBook
    deployment: str
    clock: VirtualClock = field(default_factory=lambda: VirtualClock(1000.0))
    nodes: dict[str, FakeNode] = field(default_factory=dict)

    async def record(self, node_id: str) -> tuple[Removal, int] | None:
        kv = await self.nc.jetstream().key_value(subjects.AUTOSCALER_BUCKET)
        try:
            entry = await kv.get(subjects.removal_key(node_id))
        except KeyNotFoundError:
            return None
        return removal_decoder.decode(entry.value), entry.revision

    async def node(self, node_id: str, **kw: object) -> FakeNode:
        node = FakeNode(node_id, **kw)  # type: ignore[arg-type]
        await node.serve(self.nc)
        self.nodes[node_id] = node
        return node

    def scaler(self, gate: Gate, running: list[str], *, lo: int = 1, hi: int = 4) -> tuple[Autoscaler, VirtualActuator, CollectorRegistry]:
        fleet = FleetView()
        fleet.put_deployment(registry.DeploymentRecord(name=self.deployment, bundle="b", models=[], replicas=1, min_replicas=lo, max_replicas=hi))
        actuator = VirtualActuator({(self.deployment, "decode"): list(running)})
        metrics = CollectorRegistry()

        async def publish(data: bytes) -> None:
            pass

        scaler = Autoscaler(fleet, actuator, NatsNodeControl(self.nc, timeout=1.0), publish, self.clock, CONFIG, AutoscalerMetrics(metrics),
                            drain_poll=0.5, book=self.book, gate=gate)  # fmt: skip
        return scaler, actuator, metrics

    def hear(self, scaler: Autoscaler, node_id: str, *, running: int = 0, queue: int = 0, in_flight: int | None = None, cordoned_by: str = "") -> None:
        hb = messages.NodeHeartbeat(node_id=node_id, deployment=self.deployment, interval_s=10.0, running=running, queue_depth=queue, max_batch=8,
                                    in_flight=running + queue if in_flight is None else in_flight,
                                    cordoned=bool(cordoned_by), draining=bool(cordoned_by), cordon_owner=cordoned_by)  # fmt: skip
        scaler.fleet.heard(hb, self.clock.monotonic())

    def removal(self, node_id: str, *, phase: str = "draining", holder: str = "crashed-1", term: int = 1) -> Removal:
        return Removal(deployment=self.deployment, pool="decode", node_id=node_id, phase=phase, began_at=1.0, holder=holder, term=term)  # type: ignore[arg-type]


@pytest.fixture
async def env(private_nats_url: str) -> AsyncIterator[Env]:
    nc = await nats.connect(private_nats_url)
    js = nc.jetstream()
    with contextlib.suppress(BucketNotFoundError, NotFoundError):
        await js.delete_key_value(subjects.AUTOSCALER_BUCKET)
    kv = await open_autoscaler_bucket(js, replicas=3)  # one server: falls back to one copy

    async def bucket():  # type: ignore[no-untyped-def]
        return kv

    try:
        yield Env(nc, KvRemovalBook(js, bucket), f"du-{uuid.uuid4().hex[:6]}")
    finally:
        await nc.drain()


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def recovered(metrics: CollectorRegistry, outcome: str) -> float:
    return metrics.get_sample_value("tierflow_autoscaler_recovered_removals_total", {"outcome": outcome}) or 0.0


async def test_the_record_comes_before_the_drain_and_its_phase_before_the_stop(env: Env) -> None:
    """So a crash at any point leaves a record for every cordon of the autoscaler's."""
    gate = Gate("as-1", 3)
    scaler, actuator, _ = env.scaler(gate, ["n0", "n1"], hi=1)  # two nodes, max one: give one back now
    seen: list[tuple[str, Removal | None]] = []

    async def on_command(action: str) -> None:
        held = await env.record("n1")
        seen.append((action, held[0] if held else None))

    await env.node("n0")
    await env.node("n1", on_command=on_command)
    env.hear(scaler, "n0", in_flight=2)
    env.hear(scaler, "n1")
    stop_node = actuator.stop_node

    async def stop_and_look(deployment: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        held = await env.record(node_id)
        seen.append(("stop", held[0] if held else None))
        await stop_node(deployment, pool, node_id)

    actuator.stop_node = stop_and_look  # type: ignore[method-assign]
    [decision] = await scaler.tick()
    assert decision.pools[0].action == "down"
    await until(lambda: ("stop", env.deployment, "decode", "n1") in actuator.calls)
    await until(lambda: not scaler.removing(env.deployment, "decode"))
    assert [action for action, _ in seen] == ["drain", "stop"]
    drain, stop = seen[0][1], seen[1][1]
    assert drain is not None and (drain.phase, drain.holder, drain.term, drain.deployment, drain.pool) == ("draining", "as-1", 3, env.deployment, "decode")
    assert stop is not None and stop.phase == "stopping"
    assert await env.record("n1") is None  # deleted once the node is stopped
    assert env.nodes["n0"].commands == []


async def test_a_successor_finishes_a_removal_its_predecessor_left_mid_drain(env: Env) -> None:
    """The node is cordoned by "autoscaler" and has a record: the first tick of the new
    active instance lets the policy decide (idle: hold), so the removal is finished."""
    await env.book.begin(env.removal("n1"))
    await env.node("n0")
    n1 = await env.node("n1", cordoned_by=AUTOSCALER_OWNER)
    scaler, actuator, metrics = env.scaler(Gate("as-2", 2), ["n0", "n1"])
    env.hear(scaler, "n0")
    env.hear(scaler, "n1", cordoned_by=AUTOSCALER_OWNER)
    [decision] = await scaler.tick()  # one tick, no more
    assert decision.pools[0].action == "hold" and decision.pools[0].inputs["removing"] == 1
    await until(lambda: ("stop", env.deployment, "decode", "n1") in actuator.calls)
    await until(lambda: not scaler.removing(env.deployment, "decode"))
    assert n1.commands == ["status", "drain"]  # asked, drained again (idempotent), stopped
    assert await env.record("n1") is None
    assert actuator.nodes[(env.deployment, "decode")] == ["n0"]  # the policy's count: one
    assert recovered(metrics, "resumed") == 1


async def test_a_successor_takes_back_a_draining_node_when_the_load_needs_it(env: Env) -> None:
    await env.book.begin(env.removal("n1"))
    await env.node("n0")
    n1 = await env.node("n1", cordoned_by=AUTOSCALER_OWNER)
    scaler, actuator, _ = env.scaler(Gate("as-2", 2), ["n0", "n1"])
    env.hear(scaler, "n0", running=8, queue=20)  # a full batch and 20 waiting
    env.hear(scaler, "n1", cordoned_by=AUTOSCALER_OWNER)
    [decision] = await scaler.tick()
    up = decision.pools[0]
    assert up.action == "up"
    assert "uncordon" in n1.commands and not n1.cordoned
    assert ("start", env.deployment, "decode", up.desired - up.current - 1) in actuator.calls  # n1 came back instead of one new node
    assert not [c for c in actuator.calls if c[0] == "stop"]
    assert await env.record("n1") is None and scaler.removing(env.deployment, "decode") == []


async def test_records_of_nodes_gone_or_not_ours_are_dropped_and_other_cordons_left_alone(env: Env) -> None:
    for node_id in ("n2", "n3", "n4"):
        await env.book.begin(env.removal(node_id))
    await env.node("n0")
    n2 = await env.node("n2", cordoned_by=OPERATOR_OWNER)  # an operator took it over
    n3 = await env.node("n3")  # uncordoned meanwhile (taken back, the record not yet deleted)
    # n4: stopped before the crash; it neither answers nor beats
    n5 = await env.node("n5", cordoned_by=AUTOSCALER_OWNER)  # an own cordon with no record
    scaler, actuator, metrics = env.scaler(Gate("as-2", 2), ["n0", "n2", "n3", "n5"])
    env.hear(scaler, "n0")
    env.hear(scaler, "n2", cordoned_by=OPERATOR_OWNER)
    env.hear(scaler, "n3")
    env.hear(scaler, "n5", cordoned_by=AUTOSCALER_OWNER)
    [decision] = await scaler.tick()
    assert decision.pools[0].action == "hold"
    assert [await env.record(n) for n in ("n2", "n3", "n4")] == [None, None, None]
    assert n2.commands == ["status"] and n2.owner == OPERATOR_OWNER and n2.cordoned
    assert n3.commands == ["status"] and not n3.cordoned
    assert n5.commands == [] and n5.owner == AUTOSCALER_OWNER
    assert actuator.calls == [] and scaler.removing(env.deployment, "decode") == []
    assert (recovered(metrics, "not_ours"), recovered(metrics, "gone"), recovered(metrics, "resumed")) == (2, 1, 0)


async def test_an_instance_that_lost_its_lease_stops_and_its_successor_fences_it(env: Env) -> None:
    """Mid-drain the lease goes (NATS cut it off, a standby took over): nothing more is
    drained or stopped by it; the successor adopts the record (a new term), finishes the
    removal, and the deposed instance's late write to the record is refused."""
    gate_a = Gate("as-1", 1)
    scaler_a, actuator_a, _ = env.scaler(gate_a, ["n0", "n1"], hi=1)
    await env.node("n0")
    n1 = await env.node("n1", in_flight=3)  # empties by one request per status poll
    env.hear(scaler_a, "n0", in_flight=9)
    env.hear(scaler_a, "n1", in_flight=3)
    await scaler_a.tick()
    await until(lambda: n1.commands == ["drain"])
    gate_a.open = False  # the lease is gone
    for _ in range(10):
        env.clock.advance(0.5)  # past several drain polls
        await asyncio.sleep(0.02)
    await until(lambda: not scaler_a.removing(env.deployment, "decode"))
    assert n1.commands == ["drain"] and actuator_a.calls == []
    held = await env.record("n1")
    assert held is not None and (held[0].holder, held[0].term, held[0].phase) == ("as-1", 1, "draining")
    a_record, a_revision = held

    scaler_b, actuator_b, metrics_b = env.scaler(Gate("as-2", 2), ["n0", "n1"], hi=1)
    env.hear(scaler_b, "n0", in_flight=9)
    env.hear(scaler_b, "n1", in_flight=3, cordoned_by=AUTOSCALER_OWNER)
    await scaler_b.tick()
    adopted = await env.record("n1")
    assert adopted is not None and (adopted[0].holder, adopted[0].term) == ("as-2", 2)
    with pytest.raises(RemovalConflict):  # the deposed instance wakes up and tries to move on
        await env.book.advance(Removal(**{**{f: getattr(a_record, f) for f in a_record.__struct_fields__}, "phase": "stopping"}), a_revision)
    while ("stop", env.deployment, "decode", "n1") not in actuator_b.calls:
        env.clock.advance(0.5)
        await asyncio.sleep(0.02)
    await until(lambda: not scaler_b.removing(env.deployment, "decode"))
    assert await env.record("n1") is None and recovered(metrics_b, "resumed") == 1
    assert actuator_a.calls == []


class LosesCancellations:
    """A node control whose replies outrun a cancellation, as nats-py's request can on
    Python 3.11 (asyncio.wait_for returns the reply that arrived with the cancel)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def command(self, node_id: str, action: str) -> messages.NodeCommandReply:
        self.commands.append(action)
        if action == "status":
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.2)
        cordoned = action != "uncordon"
        return messages.NodeCommandReply(node_id=node_id, cordoned=cordoned, draining=cordoned, in_flight=100,
                                         cordon_owner=AUTOSCALER_OWNER if cordoned else "")  # fmt: skip


async def test_a_node_taken_back_mid_drain_is_never_stopped_even_if_the_cancellation_is_lost(env: Env) -> None:
    scaler, actuator, _ = env.scaler(Gate("as-1", 1), ["n0", "n1"], hi=1)
    control = LosesCancellations()
    scaler._remover._control = control  # type: ignore[union-attr]
    env.hear(scaler, "n0", in_flight=9)
    env.hear(scaler, "n1")
    await scaler.tick()
    await until(lambda: control.commands == ["drain"])
    env.clock.advance(0.5)  # the first status poll, which will not notice its cancellation
    await until(lambda: control.commands == ["drain", "status"])
    async with asyncio.timeout(5):
        assert await scaler._remover.take_back(env.deployment, "decode", 1) == 1  # type: ignore[union-attr]
    for _ in range(5):  # the removal's task, had it gone on, would poll again and stop the node
        env.clock.advance(0.5)
        await asyncio.sleep(0.05)
    assert control.commands == ["drain", "status", "uncordon"]
    assert actuator.calls == [] and await env.record("n1") is None
