"""The autoscaler service over a real nats-server, with an in-memory actuator.

Heartbeats are published on NATS as nodes would send them; the deployment comes from
the registry's KV bucket; decisions are read off `subjects.AUTOSCALER_DECISIONS`; the
scale-down sequence talks to fake node control endpoints on NATS.
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
from nats.js.errors import BucketNotFoundError, NotFoundError
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages, registry, subjects
from tierflow.runtime.clock import VirtualClock
from tierflow.runtime.kv import open_bucket
from tierflow.services.autoscaler.actuators import VirtualActuator
from tierflow.services.autoscaler.bootstrap import AutoscalerService, bootstrap
from tierflow.services.autoscaler.settings import Settings

from autoscaler_fakes import FakeNode

FAST = dict(interval=0.1, panic_window=0.0, stable_window=1.0, cooldown_up=0.0, cooldown_down=0.0, max_signal_age=2.0, warm_up=0.0, lease_ttl=5.0)


@dataclass
class Harness:
    nc: NATS
    deployment: str
    actuator: VirtualActuator
    service: AutoscalerService
    stopping: asyncio.Event
    metrics: CollectorRegistry
    decisions: list[messages.AutoscalerDecision] = field(default_factory=list)

    async def beat(self, node_id: str, *, running: int = 0, queue: int = 0, interval: float = 0.2, **extra: object) -> None:
        hb = messages.NodeHeartbeat(node_id=node_id, role="decode", deployment=self.deployment, interval_s=interval,
                                    running=running, queue_depth=queue, max_batch=8, in_flight=running + queue, **extra)  # type: ignore[arg-type]
        await self.nc.publish(subjects.node_heartbeat(node_id), messages.encoder.encode(hb))

    def mine(self) -> list[messages.AutoscalerDecision]:
        return [d for d in self.decisions if d.deployment == self.deployment]

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)


async def _put_deployment(nc: NATS, name: str, *, lo: int = 1, hi: int = 4) -> None:
    kv = await open_bucket(nc.jetstream(), subjects.REGISTRY_BUCKET, create=True)
    record = registry.DeploymentRecord(name=name, bundle="b", models=[], replicas=2, min_replicas=lo, max_replicas=hi)
    await kv.put(subjects.deployment_key(name), messages.encoder.encode(record))


@pytest.fixture
async def harness_factory(nats_url: str) -> AsyncIterator[Callable[..., object]]:
    made: list[Harness] = []
    nc = await nats.connect(nats_url)
    # A test's removal records outlive it (a node it never ran cannot be uncordoned, so its
    # record stays in doubt, as it should); node ids repeat across tests: start clean.
    with contextlib.suppress(BucketNotFoundError, NotFoundError):
        await nc.jetstream().delete_key_value(subjects.AUTOSCALER_BUCKET)

    async def make(nodes: list[str], *, clock: VirtualClock | None = None, run: bool = True, **overrides: object) -> Harness:
        deployment = f"as-{uuid.uuid4().hex[:8]}"
        await _put_deployment(nc, deployment)
        actuator = VirtualActuator({(deployment, "decode"): nodes})
        metrics = CollectorRegistry()
        settings = Settings(nats_url=nats_url, **{**FAST, **overrides})  # type: ignore[arg-type]
        service = bootstrap(nc, settings, clock=clock, metrics=metrics, actuator=actuator, drain_poll=0.05)
        h = Harness(nc, deployment, actuator, service, asyncio.Event(), metrics)

        async def collect(msg: object) -> None:
            h.decisions.append(messages.decision_decoder.decode(msg.data))  # type: ignore[attr-defined]

        await nc.subscribe(subjects.AUTOSCALER_DECISIONS, cb=collect)
        await service.start(h.stopping)
        await h.wait_for(lambda: service.synced.is_set() and deployment in service.fleet.deployments)
        if run:
            h.runner = asyncio.create_task(service.run(h.stopping))  # type: ignore[attr-defined]
        made.append(h)
        return h

    yield make
    kv = await open_bucket(nc.jetstream(), subjects.REGISTRY_BUCKET)
    for h in made:
        h.stopping.set()
        if hasattr(h, "runner"):
            await h.runner
        await h.service.close()
        await kv.delete(subjects.deployment_key(h.deployment))
    await nc.drain()


async def _keep_beating(h: Harness, loads: dict[str, tuple[int, int]], stop: asyncio.Event, nodes: dict[str, FakeNode] | None = None) -> None:
    while not stop.is_set():
        for node_id, (running, queue) in list(loads.items()):
            node = nodes.get(node_id) if nodes else None
            cordoned = node is not None and node.cordoned
            await h.beat(node_id, running=running, queue=queue, cordoned=cordoned, draining=cordoned, cordon_owner=node.owner if node else "")
        await asyncio.sleep(0.05)


async def test_a_burst_of_load_publishes_a_scale_up_decision_and_starts_nodes(harness_factory) -> None:
    h: Harness = await harness_factory(["n0"])
    stop = asyncio.Event()
    beats = asyncio.create_task(_keep_beating(h, {"n0": (8, 20)}, stop))  # a full batch and 20 waiting
    try:
        await h.wait_for(lambda: any(d.action == "up" for d in h.mine()))
    finally:
        stop.set()
        await beats
    up = next(d for d in h.mine() if d.action == "up")
    assert (up.current_replicas, up.desired_replicas, up.pool, up.actuator) == (1, 4, "decode", "virtual")
    assert up.signal in ("utilization", "queue") and "asks" in up.reason
    assert up.inputs["running"] == 8 and up.inputs["waiting"] == 20 and up.inputs["ready"] == 1
    assert ("start", h.deployment, "decode", 3) in h.actuator.calls
    counted = h.metrics.get_sample_value("tierflow_autoscaler_decisions_total", {"deployment": h.deployment, "pool": "decode", "action": "up", "signal": up.signal})
    assert counted and counted >= 1
    # the three new nodes count as starting until they report: no second start meanwhile
    await asyncio.sleep(0.5)
    assert [c for c in h.actuator.calls if c[0] == "start" and c[1] == h.deployment] == [("start", h.deployment, "decode", 3)]
    assert all(d.action == "hold" for d in h.mine()[-3:])


async def test_no_decision_before_the_warm_up_so_unheard_nodes_are_not_replaced(harness_factory) -> None:
    """A (re)started autoscaler has heard no node yet: the pool looks empty, below min_replicas.
    It decides nothing until it has listened for `warm_up`; a node heard by then counts."""
    clock = VirtualClock(0.0)
    h: Harness = await harness_factory([], clock=clock, warm_up=5.0)
    for _ in range(40):  # 4 virtual seconds of ticks every 0.1 s: none may decide
        clock.advance(0.1)
        await asyncio.sleep(0.005)
    assert h.mine() == [] and h.actuator.calls == []
    await h.beat("n0", interval=1.0)  # the node `up` started, heard late
    await h.wait_for(lambda: h.service.fleet.live_ids(h.deployment, "decode", clock.monotonic()))
    for _ in range(20):
        clock.advance(0.1)
        await asyncio.sleep(0.005)
    await h.wait_for(lambda: h.mine())
    assert {d.action for d in h.mine()} == {"hold"} and h.actuator.calls == []


async def test_without_a_warm_up_the_first_tick_starts_min_replicas(harness_factory) -> None:
    """The case the warm-up exists for (and what a pool that really is empty gets)."""
    h: Harness = await harness_factory([], warm_up=0.0)
    await h.wait_for(lambda: any(c[0] == "start" for c in h.actuator.calls))
    assert ("start", h.deployment, "decode", 1) in h.actuator.calls


async def test_every_tick_publishes_a_decision_holds_included(harness_factory) -> None:
    h: Harness = await harness_factory(["n0"], stable_window=60.0)
    stop = asyncio.Event()
    beats = asyncio.create_task(_keep_beating(h, {"n0": (2, 0)}, stop))
    try:
        await h.wait_for(lambda: len(h.mine()) >= 5)
    finally:
        stop.set()
        await beats
    assert {d.action for d in h.mine()} == {"hold"}
    assert all(d.reason and "ready" in d.inputs for d in h.mine())


@pytest.mark.parametrize("beat_interval", [1.0, 10.0], ids=["silent", "live-but-stale"])
async def test_stale_heartbeats_never_scale_down(harness_factory, beat_interval: float) -> None:
    """Idle nodes that went quiet: nothing is removed, however long the autoscaler waits.
    With a 1 s heartbeat they drop out of the pool (nothing to go on); with a 10 s one they
    still count as live, but their figures are older than max_signal_age (stale)."""
    clock = VirtualClock(1000.0)
    h: Harness = await harness_factory(["n0", "n1", "n2"], clock=clock, run=False, max_signal_age=2.0, stable_window=5.0)
    for node_id in ("n0", "n1", "n2"):
        await h.beat(node_id, interval=beat_interval)
    await h.wait_for(lambda: len(h.service.fleet.live_ids(h.deployment, "decode", clock.monotonic())) == 3)
    for _ in range(12):  # 24 virtual seconds of silence, far past the stable window
        clock.advance(2.0)
        decisions = await h.service.autoscaler.tick()
        mine = next(d for d in decisions if d.deployment == h.deployment)
        assert [p.action for p in mine.pools] == ["hold"], mine
    assert mine.pools[0].signal == ("none" if beat_interval == 1.0 else "stale")
    assert not [c for c in h.actuator.calls if c[0] == "stop" and c[1] == h.deployment]
    # ...while the same idle nodes, heard all along, are scaled down after the stable window
    for _ in range(10):
        for node_id in ("n0", "n1", "n2"):
            await h.beat(node_id, interval=beat_interval)
        await asyncio.sleep(0.05)
        clock.advance(1.0)
        await h.service.autoscaler.tick()
    assert any(d.action == "down" for d in h.mine())


async def test_scale_down_cordons_drains_then_stops_the_least_busy_node(harness_factory, nats_url: str) -> None:
    h: Harness = await harness_factory(["n0", "n1"])
    nc = await nats.connect(nats_url)
    nodes = {"n0": FakeNode("n0", in_flight=3), "n1": FakeNode("n1", in_flight=1)}
    for node in nodes.values():
        await node.serve(nc)
    stop = asyncio.Event()
    beats = asyncio.create_task(_keep_beating(h, {"n0": (3, 0), "n1": (1, 0)}, stop, nodes))  # 4 requests: one node does
    try:
        await h.wait_for(lambda: ("stop", h.deployment, "decode", "n1") in h.actuator.calls)
        down = next(d for d in h.mine() if d.action == "down")
        assert down.victims == ["n1"] and (down.current_replicas, down.desired_replicas) == (2, 1)
        # drain first, then poll until nothing is in flight, and only then stop
        assert nodes["n1"].commands[0] == "drain" and nodes["n1"].in_flight == 0
        assert nodes["n0"].commands == []
        await h.wait_for(lambda: h.service.autoscaler.removing(h.deployment, "decode") == [])
    finally:
        stop.set()
        await beats
        await nc.drain()
    drains = h.metrics.get_sample_value("tierflow_autoscaler_actuations_total", {"deployment": h.deployment, "pool": "decode", "operation": "drain", "outcome": "ok"})
    assert drains == 1


async def test_load_returning_mid_drain_takes_the_node_back(harness_factory, nats_url: str) -> None:
    h: Harness = await harness_factory(["n0", "n1"])
    nc = await nats.connect(nats_url)
    stuck = FakeNode("n1", in_flight=10_000)  # never empties on its own
    await stuck.serve(nc)
    await FakeNode("n0").serve(nc)
    loads = {"n0": (1, 0), "n1": (0, 0)}
    stop = asyncio.Event()
    beats = asyncio.create_task(_keep_beating(h, loads, stop, {"n1": stuck}))
    try:
        await h.wait_for(lambda: h.service.autoscaler.removing(h.deployment, "decode") == ["n1"])
        loads["n0"] = (8, 30)  # the spike comes back while n1 drains
        await h.wait_for(lambda: "uncordon" in stuck.commands)
        await h.wait_for(lambda: h.service.autoscaler.removing(h.deployment, "decode") == [])
    finally:
        stop.set()
        await beats
        await nc.drain()
    assert not [c for c in h.actuator.calls if c[0] == "stop" and c[1] == h.deployment]
    up = next(d for d in h.mine() if d.action == "up")
    starts = [c for c in h.actuator.calls if c[0] == "start" and c[1] == h.deployment]
    assert starts[0] == ("start", h.deployment, "decode", up.desired_replicas - up.current_replicas - 1)  # n1 came back instead of one new node
