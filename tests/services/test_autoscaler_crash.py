"""Kill -9 of the autoscaler right after it starts a drain; a new one finishes the job.

Everything that matters runs as it does in production: the registry applies a fleet
(in this process), three real decode-node processes run under the same `NodeLauncher`
and supervisor subject `tierflow up` uses, the operator cordons one with the real CLI,
and each autoscaler is a real `python -m tierflow autoscaler --actuator local` process.

The deployment allows one node and runs two ready ones (plus the operator's cordoned
one), so the autoscaler gives one back at once. Both ready nodes are busy with long
generations, so the drain cannot finish before the SIGKILL, which comes as soon as a
heartbeat shows a node cordoned by "autoscaler". Then the generations are cancelled and
a second autoscaler starts: within 2 ticks of taking the lease it has stopped (or taken
back) the node, the pool's live uncordoned nodes equal its desired count, and the
operator's node stayed cordoned by the operator throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from tierflow.cli.supervisor import Supervisor
from tierflow.cli.up import NodeLauncher, SupervisorControl, UpConfig
from tierflow.contracts import messages, subjects
from tierflow.contracts.autoscaler import AUTOSCALER_OWNER, OPERATOR_OWNER, removal_decoder
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings

from autoscaler_procs import AutoscalerProcess, current_lease, start_autoscaler

REPO = Path(__file__).resolve().parents[2]
INTERVAL = 1.5
# warm-up <= lease ttl: a successor has heard the fleet by the time the lease is its own
FLAGS = ("--actuator", "local", "--interval", str(INTERVAL), "--lease-ttl", "4", "--warm-up", "3", "--max-signal-age", "3")
MODEL = "llama-3.1-8b"
BUSY = 8  # generations kept on each ready node (its batch is 4: one running, one queued)


class RecordingLauncher(NodeLauncher):
    """`tierflow up`'s launcher, noting when each supervisor command arrives."""

    commands: list[tuple[float, messages.SupervisorCommand]]

    async def handle(self, command: messages.SupervisorCommand) -> messages.SupervisorReply:
        self.commands.append((time.monotonic(), command))
        return await super().handle(command)


class Beats:
    """Every heartbeat heard, with when (this process's monotonic clock)."""

    def __init__(self) -> None:
        self.all: list[tuple[float, messages.NodeHeartbeat]] = []
        self.last: dict[str, tuple[float, messages.NodeHeartbeat]] = {}

    async def on(self, msg) -> None:  # type: ignore[no-untyped-def]
        hb = messages.heartbeat_decoder.decode(msg.data)
        seen = (time.monotonic(), hb)
        self.all.append(seen)
        self.last[hb.node_id] = seen

    def live(self, within: float = 2.5) -> dict[str, messages.NodeHeartbeat]:
        now = time.monotonic()
        return {n: hb for n, (t, hb) in self.last.items() if now - t <= within}


async def until(predicate: Callable[[], object], what: str, timeout: float = 90.0, logs: Callable[[], str] = lambda: "") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}\n{logs()}") from None


async def removal_record(nc: NATS, node_id: str):  # type: ignore[no-untyped-def]
    try:
        kv = await nc.jetstream().key_value(subjects.AUTOSCALER_BUCKET)
        return removal_decoder.decode((await kv.get(subjects.removal_key(node_id))).value)
    except (BucketNotFoundError, KeyNotFoundError):
        return None


async def generate(nc: NATS, node_id: str) -> str:
    """A long generation on `node_id` (its tokens are read and dropped); its request id."""
    request_id = f"crash-{uuid.uuid4().hex[:8]}"
    inbox = nc.new_inbox()

    async def drop(msg) -> None:  # type: ignore[no-untyped-def]
        pass

    await nc.subscribe(inbox, cb=drop)
    request = messages.GenerateRequest(request_id=request_id, model=MODEL, prompt_token_ids=list(range(1, 65)), max_tokens=8000, ignore_eos=True)
    await nc.publish(subjects.node_generate(node_id), messages.encoder.encode(request), reply=inbox)
    return request_id


async def test_a_new_autoscaler_finishes_the_drain_a_killed_one_started(private_nats_url: str, tmp_path: Path) -> None:
    fleet = (REPO / "deploy/examples/fleet.yaml").read_text()
    fleet = fleet.replace("    replicas: 2\n    min_replicas: 1\n    max_replicas: 4\n", "    replicas: 1\n    min_replicas: 1\n    max_replicas: 1\n")
    assert "max_replicas: 1" in fleet
    (tmp_path / "fleet.yaml").write_text(fleet)
    registry_ctx = ServiceContext(service="model-registry", instance="crash-test")
    registry = asyncio.create_task(registry_main(registry_ctx, RegistrySettings(nats_url=private_nats_url, grpc_port=free_port(), fleet=str(tmp_path / "fleet.yaml"))))

    nc = await nats.connect(private_nats_url)
    beats = Beats()
    await nc.subscribe(subjects.NODE_HEARTBEATS, cb=beats.on)
    decisions: list[messages.AutoscalerDecision] = []

    async def on_decision(msg) -> None:  # type: ignore[no-untyped-def]
        decisions.append(messages.decision_decoder.decode(msg.data))

    await nc.subscribe(subjects.AUTOSCALER_DECISIONS, cb=on_decision)
    port = int(private_nats_url.rsplit(":", 1)[1])
    config = UpConfig(data_dir=tmp_path / "up", nats_port=port, decode_nodes=1, prefill_nodes=0, metrics_base_port=free_port())
    supervisor = Supervisor()
    launcher = RecordingLauncher(config, supervisor, [])
    launcher.commands = []
    control = SupervisorControl(launcher)
    await control.start(private_nats_url)
    procs: list[AutoscalerProcess] = []

    def logs() -> str:
        out = [f"--- {p.instance}\n{p.log()[-4000:]}" for p in procs]
        out += [f"--- {c.name}\n" + "\n".join(c.log_tail(15)) for c in supervisor.children]
        return "\n".join(out)

    try:
        operator, *ready = [(await launcher.start("decode", "default")).node_id for _ in range(3)]
        await until(lambda: set(beats.live()) >= {operator, *ready}, "three nodes beating", logs=logs)
        cli = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tierflow", "nodes", "cordon", operator, "--nats-url", private_nats_url],
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
        assert cli.returncode == 0 and "cordoned (by operator)" in cli.stdout, cli.stdout + cli.stderr
        cordoned_at = time.monotonic()
        await until(lambda: beats.last[operator][1].cordon_owner == OPERATOR_OWNER, "the operator's cordon in a heartbeat")

        # Both ready nodes kept busy (8,000-token generations, topped up as they finish) from
        # before the autoscaler starts until the kill; then every one is cancelled.
        requests: dict[str, list[str]] = {n: [] for n in ready}
        killed = asyncio.Event()

        async def keep_busy() -> None:
            while not killed.is_set():
                for n in ready:
                    if beats.last[n][1].in_flight < BUSY and len(requests[n]) < 64:
                        requests[n] += [await generate(nc, n) for _ in range(BUSY)]
                await asyncio.wait([asyncio.ensure_future(killed.wait())], timeout=1.0)

        busy = asyncio.create_task(keep_busy())
        await until(lambda: all(beats.last[n][1].in_flight >= BUSY for n in ready), "both nodes busy", logs=logs)
        first = start_autoscaler(private_nats_url, "as-1", tmp_path, *FLAGS)
        procs.append(first)

        async def lease_holder() -> str:
            lease = await current_lease(nc)
            return lease.holder if lease is not None else ""

        def victim() -> str | None:
            return next((n for n in ready if beats.last[n][1].cordoned and beats.last[n][1].cordon_owner == AUTOSCALER_OWNER), None)

        await until(lambda: victim() is not None, "a node cordoned by the autoscaler", logs=logs)
        first.kill()  # right after the drain started
        killed.set()
        await busy
        node = victim()
        assert node is not None
        [survivor] = [n for n in ready if n != node]
        record = await removal_record(nc, node)
        assert record is not None and (record.phase, record.holder, record.node_id) == ("draining", "as-1", node), (record, logs())
        assert beats.last[node][1].in_flight >= 1, logs()  # it really was mid-drain
        assert not [c for _, c in launcher.commands if c.action == "stop"]
        for n, ids in requests.items():  # the work ends; the node now only waits for its successor
            for request_id in ids:
                await nc.publish(subjects.node_cancel(n), messages.encoder.encode(messages.CancelRequest(request_id=request_id)))
        await until(lambda: beats.last[node][1].in_flight == 0, f"{node} empty after the cancellations", logs=logs)

        second = start_autoscaler(private_nats_url, "as-2", tmp_path, *FLAGS)
        procs.append(second)
        async with asyncio.timeout(90):
            while await lease_holder() != "as-2":
                assert second.process.poll() is None, logs()
                await asyncio.sleep(0.02)
        active_at = time.monotonic()

        def finished_at() -> float | None:
            stops = [t for t, c in launcher.commands if c.action == "stop" and c.node_id == node]
            back = [t for t, hb in beats.all if hb.node_id == node and t > active_at and not hb.cordoned]
            return min(stops + back, default=None)

        await until(lambda: finished_at() is not None, f"{node} stopped or uncordoned", timeout=30, logs=logs)
        done = finished_at()
        assert done is not None and done - active_at <= 2 * INTERVAL, f"{done - active_at:.2f}s after taking the lease\n{logs()}"

        def settled() -> bool:
            live = beats.live()
            return node not in live or not live[node].cordoned

        await until(settled, f"{node} gone or back in rotation", logs=logs)
        mine = [d for d in decisions if d.deployment == "default"]
        assert mine and mine[-1].desired_replicas == 1
        live = beats.live()
        serving = [n for n, hb in live.items() if hb.deployment == "default" and not hb.cordoned]
        assert len(serving) == mine[-1].desired_replicas, (serving, mine[-1])
        assert await removal_record(nc, node) is None
        # the operator's node: cordoned by the operator in every heartbeat since, never touched
        since = [hb for t, hb in beats.all if hb.node_id == operator and t > cordoned_at + 0.5]
        assert since and all(hb.cordoned and hb.cordon_owner == OPERATOR_OWNER for hb in since)
        assert operator in live
        assert not [c for _, c in launcher.commands if c.action == "stop" and c.node_id in (operator, survivor)]
        assert await second.metric("tierflow_autoscaler_recovered_removals_total", outcome="resumed") == 1
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop()
        await control.close()
        await supervisor.stop_all(grace=5)
        registry_ctx.stopping.set()
        await asyncio.gather(registry, return_exceptions=True)
        await nc.drain()
