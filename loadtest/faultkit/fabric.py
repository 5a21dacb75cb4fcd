"""The fabric under test and the hands that hurt it: start, find a process, signal it, see it back.

`start` runs `tierflow up` (through `tierflow.harness.start_fabric`, as every benchmark
here does) on the suite's fleet (`loadtest/fleets/faults.yaml`: an agentic bundle on
three decode nodes, a disaggregated 70B with one decode and three prefill nodes) with a
3-server NATS cluster and two routers, then waits until every node heartbeats, the ones
the autoscaler starts included.

Processes are found by name in DATA/children.json (`Fabric.child`), so a kill always
hits the current incarnation, and `wait_back` sees the restarted one (a new pid,
running). `NodeWatch` follows the nodes' heartbeats on its own NATS connection (the
cluster's every member, reconnecting forever, so it outlives the faults) and probes a
node directly over NATS the way a router would (`probe`): "serves again" means it
answers a request of its own model (takes it: a node whose batch is full queues it),
not merely that it beats.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from tierflow.cli.children_file import ChildRecord
from tierflow.contracts import messages, subjects
from tierflow.harness import Fabric, start_fabric
from tierflow.runtime import nats_auth
from tierflow.tokenizer import encode

__all__ = ["FLEET", "PROFILES", "Layout", "NodeWatch", "connect", "signal_child", "start", "wait_back"]

HERE = Path(__file__).resolve().parent
FLEET = HERE.parent / "fleets" / "faults.yaml"
PROFILES = HERE.parent / "fleets" / "faults-profiles.yaml"
REPO = HERE.parents[1]
# The autoscaler starts the disaggregated deployment's decode node: let it decide soon.
AUTOSCALER_ENV = {"TIERFLOW_WARM_UP": "3", "TIERFLOW_INTERVAL": "2"}


@dataclass(frozen=True)
class Layout:
    """How many of each process (`tierflow up` flags) and which nodes must beat before load."""

    nats_cluster: int = 3
    routers: int = 2
    agents_nodes: int = 3  # `--decode-nodes` of the agents deployment
    prefill_nodes: int = 3  # `--prefill-nodes`: the disaggregated deployment's pool
    # (deployment, role) -> nodes the autoscaler starts (min_replicas 1 of an empty pool):
    # the disaggregated deployment's decode node.
    extra_nodes: tuple[tuple[str, str, int], ...] = (("default", "decode", 1),)

    def argv(self) -> list[str]:
        return [
            "--fleet", str(FLEET), "--profiles", str(PROFILES), "--nats-cluster", str(self.nats_cluster),
            "--routers", str(self.routers), "--deployment", "agents", "--decode-nodes", str(self.agents_nodes),
            "--prefill-nodes", str(self.prefill_nodes),
        ]  # fmt: skip

    def expected_nodes(self) -> dict[tuple[str, str], int]:
        expected = {("agents", "decode"): self.agents_nodes, ("default", "prefill"): self.prefill_nodes}
        for deployment, role, n in self.extra_nodes:
            expected[(deployment, role)] = expected.get((deployment, role), 0) + n
        return {k: v for k, v in expected.items() if v}


def start(data_dir: Path, layout: Layout, *, env: dict[str, str] | None = None, ready_timeout: float = 120.0) -> Fabric:
    """`tierflow up` with the suite's fleet and `layout` (returns at up's ready line)."""
    return start_fabric(data_dir, *layout.argv(), ready_timeout=ready_timeout, env={**AUTOSCALER_ENV, **(env or {})}, cwd=REPO)


async def connect(fabric: Fabric, name: str) -> NATS:
    """A NATS connection to every member that reconnects forever (it must outlive the faults)."""

    async def quiet(*_: object) -> None:
        pass

    return await nats.connect(servers=fabric.nats_urls, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                              reconnect_time_wait=0.25, connect_timeout=2, ping_interval=2, max_outstanding_pings=2,
                              error_cb=quiet, disconnected_cb=quiet, reconnected_cb=quiet, **fabric.nats_options())  # fmt: skip


def signal_child(fabric: Fabric, name: str, sig: signal.Signals) -> ChildRecord:
    """Send `sig` to the child called `name` (its current pid); returns its record as it was."""
    child = fabric.child(name)
    if child.state != "running":
        raise RuntimeError(f"{name} is {child.state}, not running: cannot send it {sig.name}")
    os.kill(child.pid, sig)
    return child


async def wait_back(fabric: Fabric, name: str, old_pid: int, timeout: float) -> float | None:
    """Seconds until `name` runs again under a new pid (None: not within `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(KeyError, OSError, ValueError):
            child = fabric.child(name)
            if child.state == "running" and child.pid != old_pid:
                return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


@dataclass
class Heard:
    """A node's latest heartbeat, as far as the suite cares."""

    node_id: str
    role: str
    deployment: str
    models: list[tuple[str, str]]  # (model, version)
    running: int
    queued: int
    pid: int
    at: float  # wall clock, when received
    prefix_blocks: int = 0  # KV blocks in its prefix cache (HBM + DDR)


@dataclass
class NodeWatch:
    """Heartbeats of every node, and direct probes of one node."""

    nc: NATS
    nodes: dict[str, Heard] = field(default_factory=dict)
    _inbox: str = ""
    _waiting: dict[str, asyncio.Queue[messages.StreamEvent]] = field(default_factory=dict)

    @classmethod
    async def attach(cls, nc: NATS) -> NodeWatch:
        # Probes are answered on the admin identity's own reply streams (NATS auth lets a node
        # answer on router streams only, and the admin read only its own).
        watch = cls(nc, _inbox=nats_auth.ADMIN_STREAM_ID)

        async def on_beat(msg) -> None:  # type: ignore[no-untyped-def]
            hb = messages.heartbeat_decoder.decode(msg.data)
            watch.nodes[hb.node_id] = Heard(hb.node_id, hb.role, hb.deployment, [(m.name, m.version) for m in hb.models],
                                            hb.running, hb.queue_depth, hb.pid, time.time(), hb.prefix_cache_blocks)  # fmt: skip

        async def on_reply(msg) -> None:  # type: ignore[no-untyped-def]
            queue = watch._waiting.get(msg.subject.rsplit(".", 1)[-1])
            if queue is not None:
                queue.put_nowait(messages.stream_decoder.decode(msg.data))

        await nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_beat)
        await nc.subscribe(subjects.router_streams(watch._inbox), cb=on_reply)
        return watch

    def live(self, within: float = 3.0) -> list[Heard]:
        now = time.time()
        return [h for h in self.nodes.values() if now - h.at <= within]

    async def wait_nodes(self, expected: dict[tuple[str, str], int], timeout: float) -> None:
        """Until at least `expected[(deployment, role)]` nodes of each beat (RuntimeError naming what is missing)."""
        deadline = time.monotonic() + timeout
        while True:
            counts: dict[tuple[str, str], int] = {}
            for h in self.live():
                counts[(h.deployment, h.role)] = counts.get((h.deployment, h.role), 0) + 1
            missing = {k: (counts.get(k, 0), n) for k, n in expected.items() if counts.get(k, 0) < n}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("nodes not heard within %gs: %s" % (timeout, ", ".join(f"{d}/{r} {have} of {n}" for (d, r), (have, n) in missing.items())))
            await asyncio.sleep(0.25)

    async def probe(self, node: Heard, timeout: float) -> bool:
        """One small request of the node's own model, sent straight to it; True once the
        node answers it (takes it into its queue, or anything after), then it is cancelled.

        Taking it is what "serves" means here: a node whose batch is full of the clients'
        streams queues a probe for seconds, and that node is serving, not lost.
        """
        if not node.models:
            return False
        model, version = node.models[0]
        request_id = f"probe{uuid.uuid4().hex[:12]}"
        prefill = node.role == "prefill"
        request = messages.GenerateRequest(request_id=request_id, model=model, version=version, prompt_token_ids=encode(f"probe {request_id}"),
                                           max_tokens=0 if prefill else 2, ignore_eos=True, timeout_s=timeout)  # fmt: skip
        subject = subjects.prefill_run(node.node_id) if prefill else subjects.node_generate(node.node_id)
        queue: asyncio.Queue[messages.StreamEvent] = asyncio.Queue()
        self._waiting[request_id] = queue
        answered = False
        try:
            async with asyncio.timeout(timeout):
                await self.nc.publish(subject, messages.encoder.encode(request), reply=subjects.router_stream(self._inbox, request_id))
                answered = not isinstance(await queue.get(), messages.Failed)
                return answered
        except (TimeoutError, nats.errors.Error):
            return False
        finally:
            self._waiting.pop(request_id, None)
            if answered and not prefill:
                with contextlib.suppress(nats.errors.Error):  # free the slot it may hold
                    await self.nc.publish(subjects.node_cancel(node.node_id), messages.encoder.encode(messages.CancelRequest(request_id=request_id)))
