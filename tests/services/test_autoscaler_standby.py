"""Two autoscaler processes on one nats-server: exactly one acts, the other stands by
until the lease of the first (SIGKILLed) has expired, then acts.

The actuator is the real local one (`--actuator local`); the test answers its supervisor
subject itself, recording each command (no node processes: the pool's nodes never
report, so what counts is what is asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, NotFoundError

from tierflow.contracts import messages, registry, subjects
from tierflow.runtime import discovery
from tierflow.runtime.kv import open_bucket

from autoscaler_procs import AutoscalerProcess, current_lease, start_autoscaler

DEPLOYMENT = "standby-test"
INTERVAL = 0.5
TTL = 3.0
FLAGS = ("--actuator", "local", "--interval", str(INTERVAL), "--lease-ttl", str(TTL), "--warm-up", "0", "--actuation-timeout", "5")


@dataclass
class FakeSupervisor:
    """Answers `subjects.SUPERVISOR_CONTROL` as `tierflow up` would, without processes."""

    nodes: list[messages.SupervisedNode] = field(default_factory=list)
    commands: list[tuple[float, messages.SupervisorCommand]] = field(default_factory=list)

    def starts(self) -> list[float]:
        return [t for t, c in self.commands if c.action == "start"]

    async def serve(self, nc: NATS) -> None:
        async def answer(msg) -> None:  # type: ignore[no-untyped-def]
            command = messages.supervisor_command_decoder.decode(msg.data)
            self.commands.append((time.time(), command))  # wall clock: the lease records it too, on this machine
            if command.action == "start":
                node = messages.SupervisedNode(node_id=f"{command.role}-{len(self.nodes)}", role=command.role, deployment=command.deployment)
                self.nodes.append(node)
                reply = messages.SupervisorReply(node_id=node.node_id, nodes=self.nodes)
            else:
                reply = messages.SupervisorReply(nodes=self.nodes)
            await nc.publish(msg.reply, messages.encoder.encode(reply))

        await nc.subscribe(subjects.SUPERVISOR_CONTROL, cb=answer)


async def put_deployment(nc: NATS, *, lo: int) -> None:
    kv = await open_bucket(nc.jetstream(), subjects.REGISTRY_BUCKET, create=True)
    record = registry.DeploymentRecord(name=DEPLOYMENT, bundle="b", models=[], replicas=lo, min_replicas=lo, max_replicas=4)
    await kv.put(subjects.deployment_key(DEPLOYMENT), messages.encoder.encode(record))


@pytest.fixture
async def nc(private_nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(private_nats_url)
    with contextlib.suppress(BucketNotFoundError, NotFoundError):
        await client.jetstream().delete_key_value(subjects.AUTOSCALER_BUCKET)
    try:
        yield client
    finally:
        await client.drain()


async def until(predicate, what: str, timeout: float = 60.0, procs: tuple[AutoscalerProcess, ...] = ()) -> None:  # type: ignore[no-untyped-def]
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        logs = "\n".join(f"--- {p.instance}\n{p.log()[-4000:]}" for p in procs)
        raise AssertionError(f"timed out waiting for {what}\n{logs}") from None


async def test_one_acts_the_other_stands_by_and_takes_over_once_the_lease_expired(nc: NATS, private_nats_url: str, tmp_path: Path) -> None:
    supervisor = FakeSupervisor()
    await supervisor.serve(nc)
    decisions: list[tuple[float, messages.AutoscalerDecision]] = []

    async def on_decision(msg) -> None:  # type: ignore[no-untyped-def]
        decision = messages.decision_decoder.decode(msg.data)
        if decision.deployment == DEPLOYMENT:
            decisions.append((time.monotonic(), decision))

    await nc.subscribe(subjects.AUTOSCALER_DECISIONS, cb=on_decision)
    await put_deployment(nc, lo=1)  # an empty pool below its minimum: one node must be started, once
    procs = (start_autoscaler(private_nats_url, "as-1", tmp_path, *FLAGS), start_autoscaler(private_nats_url, "as-2", tmp_path, *FLAGS))
    try:
        for p in procs:
            await p.wait_serving()

        async def both_heard() -> bool:
            return len(supervisor.starts()) >= 1 and len(decisions) >= 12

        await until(both_heard, "a start and 12 decisions", procs=procs)
        leaders = {p.instance: await p.metric("tierflow_autoscaler_leader") for p in procs}
        assert sorted(leaders.values()) == [0.0, 1.0], leaders
        active, standby = (procs[0], procs[1]) if leaders["as-1"] == 1.0 else (procs[1], procs[0])
        lease = await current_lease(nc)
        assert lease is not None and lease.holder == active.instance
        # exactly one acts: its decisions and actuations; nothing from the standby
        assert (await active.metric("tierflow_autoscaler_decisions_total") or 0) >= 8
        assert await standby.metric("tierflow_autoscaler_decisions_total") is None
        assert await active.metric("tierflow_autoscaler_actuations_total", operation="start", outcome="ok") == 1
        assert await standby.metric("tierflow_autoscaler_actuations_total") is None
        assert len(supervisor.starts()) == 1
        # one decision per tick, not two: the last 8 (past the first ticks, which a new lease
        # and the end of the warm-up hurry) came no faster than one per interval, with slack
        times = [t for t, _ in decisions[-8:]]
        assert times[-1] - times[0] >= 7 * INTERVAL * 0.8, "decisions come faster than one instance ticks"
        modes = {s.metadata.get("holder"): s.metadata.get("mode") for s in await discovery.discover(nc) if s.name == subjects.SERVICE_NAMES["autoscaler"]}
        assert modes == {active.instance: "active", standby.instance: "standby"}, modes

        # the active one dies; meanwhile the pool's minimum goes up: only the standby can act on it
        active.kill()
        last = await current_lease(nc)  # as the dead one left it: its last renewal
        assert last is not None and last.holder == active.instance
        await put_deployment(nc, lo=2)

        async def second_start() -> bool:
            return len(supervisor.starts()) >= 2

        await until(second_start, "the standby to take over and start a node", procs=procs)
        # not before the lease could have expired: a whole ttl after its last renewal
        assert supervisor.starts()[1] >= last.renewed_at + TTL - 0.05, (supervisor.starts()[1] - last.renewed_at)
        assert len(supervisor.starts()) == 2  # one more node, once
        assert await standby.metric("tierflow_autoscaler_leader") == 1.0
        assert await standby.metric("tierflow_autoscaler_actuations_total", operation="start", outcome="ok") == 1
        assert (await standby.metric("tierflow_autoscaler_decisions_total") or 0) >= 1
        lease2 = await current_lease(nc)
        assert lease2 is not None and (lease2.holder, lease2.term) == (standby.instance, lease.term + 1)
        assert "is active (term" in standby.log() and "expired" in standby.log()

        async def announced_active() -> bool:
            found = await discovery.discover(nc)
            return any(s.metadata.get("holder") == standby.instance and s.metadata.get("mode") == "active" for s in found)

        await until(announced_active, "discovery to say the standby is active", timeout=10, procs=procs)
    finally:
        for p in procs:
            p.stop()
    released = await current_lease(nc)
    assert released is not None and released.holder == ""  # a clean stop hands the lease back
