"""The faults, one function each: whom to hurt, how, and what to note while it recovers.

Each fault gets a `Ctx` (the fabric, the heartbeat watch, a log line callback) and
returns an `Injection`: the victim, the signal, when it struck, and how long the victim
took to be back at work. For a kill, `tierflow up` restarts the process (`wait_back`
sees the new pid), and "back" means it does its job again: a node beats (under its new
pid), a router, the registry or the autoscaler answers NATS service discovery (its new
pid in the metadata), a NATS member answers /healthz. Victims are chosen where a fault
hurts most: the node with the most streams running (its heartbeat says; for a prefill
node the suite waits up to 10 s for one that is busy, since a prefill lasts about a
second), the NATS member with the most client connections (its /varz says).

The NATS outage stops *every* member with SIGSTOP for 5 s, then SIGCONT. Not SIGKILL
and restart: a killed member is restarted by `tierflow up` after its own backoff (0.5 s,
then 1 s, ...), so the outage would last whatever that takes, not 5 s; and a stopped
server is the harder case for clients, since their TCP connections stay open and no
reset tells them anything: they must notice the silence themselves (pings, liveness,
stalled watches). It is also what a network partition or a frozen VM looks like.
Right after SIGCONT it measures what the issue asks of that outage: every node answers a
request sent straight to it within 10 s (`NodeWatch.probe`), and a registry change
(a planner v2 rollout at 50%) reaches both routers within 2 s, seen in the
`x-tierflow-model-version` of requests spread over both (a fresh connection each:
SO_REUSEPORT spreads connections, not requests); which router answered each is read from
the routers' logs afterwards. The change is made once every router hears every decode
node again (each router's `tierflow_router_live_nodes`, on its own metrics port; at
most 10 s, when that is a failure of its own): the header names the version that served
the call, and a router that picked v2 before it heard the v2 node again falls back to
v1, which would time the heartbeats, not the watch. The routers' own "watch ...
resumed" log lines (seconds after SIGCONT) are judged beside it: a watch that came back
late shows there even when the change was made after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from tierflow.contracts import subjects
from tierflow.harness import Fabric
from tierflow.runtime import discovery
from tierflow.runtime.nats_server import http_get
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1.registry_pb2_grpc import ModelRegistryStub

from .fabric import Heard, NodeWatch, signal_child, wait_back

__all__ = ["FAULTS", "Ctx", "Fault", "Injection", "VersionProbe"]

Kind = Literal["kill", "stall", "outage"]
NATS_STOP_S = 5.0
NODE_STOP_S = 3.0
WATCH_MODEL = "planner"  # the model whose v2 rollout times the routers' registry watch
WATCH_VERSION = "v2"
PROBE_S = 5.0  # how long the routers are probed after the change
PROBE_EVERY_S = 0.025


@dataclass
class Ctx:
    fabric: Fabric
    watch: NodeWatch
    say: Callable[[str], None]
    back_timeout: float = 60.0


@dataclass
class VersionProbe:
    """One request sent through the routers after the outage's registry change."""

    sent: float
    done: float
    status: int
    version: str
    request_id: str


@dataclass
class Injection:
    victim: str
    how: str  # "SIGKILL", "SIGSTOP 3s", ...
    at: float  # wall clock when it struck (for an outage: when it ended, SIGCONT)
    back_s: float | None = None  # until the victim ran (and a node beat) again
    facts: dict[str, Any] = field(default_factory=dict)
    probes: list[VersionProbe] = field(default_factory=list)
    change_acked: float | None = None  # wall clock: the outage's registry change acknowledged


@dataclass(frozen=True)
class Fault:
    name: str
    title: str
    kind: Kind
    inject: Callable[[Ctx], Awaitable[Injection]]


def _busiest(watch: NodeWatch, *, role: str, deployment: str | None = None) -> Heard:
    nodes = [h for h in watch.live() if h.role == role and (deployment is None or h.deployment == deployment)]
    if not nodes:
        raise RuntimeError(f"no live {role} node{f' of {deployment}' if deployment else ''} to hurt")
    return max(nodes, key=lambda h: (h.running + h.queued, h.node_id))


async def _beats_again(watch: NodeWatch, node_id: str, old_pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        heard = watch.nodes.get(node_id)
        if heard is not None and heard.pid != old_pid and time.time() - heard.at < 2.0:
            return True
        await asyncio.sleep(0.1)
    return False


async def _discovered(ctx: Ctx, role: str, pid: int, timeout: float) -> bool:
    """Until a `role` service whose metadata names `pid` answers NATS service discovery."""
    deadline = time.monotonic() + timeout
    name = subjects.SERVICE_NAMES[role]
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # NATS may be reconnecting
            if any(s.name == name and s.metadata.get("pid") == str(pid) for s in await discovery.discover(ctx.watch.nc, timeout=0.3)):
                return True
        await asyncio.sleep(0.1)
    return False


async def _nats_healthy(ctx: Ctx, name: str, timeout: float) -> bool:
    member = next(m for m in ctx.fabric.nats_members() if m.name == name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if (await http_get(ctx.fabric.host, member.monitor_port, "/healthz", timeout=1.0)).status == 200:
                return True
        await asyncio.sleep(0.1)
    return False


async def _at_work(ctx: Ctx, name: str, old_pid: int, timeout: float) -> bool:
    """Whether the restarted `name` does its job again (see the module docstring)."""
    child = ctx.fabric.child(name)
    if child.role in ("decode-node", "prefill-node"):
        return await _beats_again(ctx.watch, name, old_pid, timeout)
    if child.role in subjects.SERVICE_NAMES:
        return await _discovered(ctx, child.role, child.pid, timeout)
    if child.role == "nats":
        return await _nats_healthy(ctx, name, timeout)
    return True


async def _kill(ctx: Ctx, name: str, *, node: Heard | None = None) -> Injection:
    """SIGKILL `name`; wait until `tierflow up` has it running again and it is back at work."""
    child = signal_child(ctx.fabric, name, signal.SIGKILL)
    at = time.time()
    facts: dict[str, Any] = {"pid": child.pid}
    if node is not None:
        facts["streams_running"] = node.running
    ctx.say(f"  SIGKILL {name} (pid {child.pid})" + (f", {node.running} streams running on it" if node else ""))
    back = await wait_back(ctx.fabric, name, child.pid, ctx.back_timeout)
    if back is not None:
        facts["restarted_s"] = round(back, 2)
        working = await _at_work(ctx, name, child.pid, ctx.back_timeout)
        back = time.time() - at if working else None
    ctx.say(f"  {name} back at work after {back:.1f}s" if back is not None else f"  {name} NOT back within {ctx.back_timeout:g}s")
    return Injection(name, "SIGKILL", at, back, facts)


async def kill_decode(ctx: Ctx) -> Injection:
    node = _busiest(ctx.watch, role="decode", deployment="agents")
    return await _kill(ctx, node.node_id, node=node)


async def kill_prefill(ctx: Ctx) -> Injection:
    """The prefill node a heartbeat has just shown busy: a prefill lasts about a second,
    so one beat old (< 0.25 s) it is most likely still running (up to 15 s of waiting)."""
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        fresh = [h for h in ctx.watch.live(within=0.25) if h.role == "prefill" and h.running + h.queued > 0]
        if fresh:
            return await _kill(ctx, fresh[0].node_id, node=fresh[0])
        await asyncio.sleep(0.02)
    node = _busiest(ctx.watch, role="prefill")
    return await _kill(ctx, node.node_id, node=node)


async def kill_router(ctx: Ctx) -> Injection:
    routers = sorted(c.name for c in ctx.fabric.children() if c.role == "router")
    return await _kill(ctx, routers[0])


async def kill_registry(ctx: Ctx) -> Injection:
    return await _kill(ctx, "model-registry")


async def kill_autoscaler(ctx: Ctx) -> Injection:
    return await _kill(ctx, "autoscaler")


async def _connections(fabric: Fabric) -> dict[str, int]:
    out = {}
    for member in fabric.nats_members():
        try:
            reply = await http_get(fabric.host, member.monitor_port, "/varz", timeout=2.0)
            out[member.name] = int(json.loads(reply.body).get("connections", 0))
        except (OSError, ValueError):
            out[member.name] = -1
    return out


async def kill_nats_member(ctx: Ctx) -> Injection:
    connections = await _connections(ctx.fabric)
    name = max(sorted(connections), key=lambda n: connections[n])
    injection = await _kill(ctx, name)
    injection.facts["clients_connected"] = connections[name]
    return injection


async def stall_decode(ctx: Ctx) -> Injection:
    """SIGSTOP the busiest agents node for 3 s, then SIGCONT: a node that stalls, not dies."""
    node = _busiest(ctx.watch, role="decode", deployment="agents")
    child = signal_child(ctx.fabric, node.node_id, signal.SIGSTOP)
    at = time.time()
    ctx.say(f"  SIGSTOP {node.node_id} (pid {child.pid}), {node.running} streams running on it")
    try:
        await asyncio.sleep(NODE_STOP_S)
    finally:
        signal_child(ctx.fabric, node.node_id, signal.SIGCONT)
    ctx.say(f"  SIGCONT {node.node_id} after {time.time() - at:.1f}s")
    beat = await _beats_again(ctx.watch, node.node_id, -1, ctx.back_timeout)
    return Injection(node.node_id, f"SIGSTOP {NODE_STOP_S:g}s", at, time.time() - at if beat else None, {"streams_running": node.running})


async def _version_probe(fabric: Fabric, n: int) -> VersionProbe:
    """A one-token completion of WATCH_MODEL on a fresh connection (so either router may answer)."""
    body = json.dumps({"model": WATCH_MODEL, "prompt": f"watch probe {n} {uuid.uuid4().hex[:6]}", "max_tokens": 1, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: faults\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    sent = time.time()
    status, headers = 0, {}
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(fabric.host, fabric.http_port)
            try:
                writer.write(head + body)
                status = int((await reader.readline()).split()[1])
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    key, _, value = line.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError, IndexError):
        pass
    return VersionProbe(sent, time.time(), status, headers.get("x-tierflow-model-version", ""), headers.get("x-request-id", ""))


def _metrics_port(pid: int) -> int | None:
    """A router's own --metrics-port, read off its command line (several routers share
    the HTTP port, so each one's view is only on its metrics port)."""
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
        return int(argv[argv.index("--metrics-port") + 1])
    except (OSError, ValueError, IndexError):
        return None


async def _live_nodes(fabric: Fabric, port: int) -> int:
    try:
        body = (await http_get(fabric.host, port, "/metrics", timeout=1.0)).body.decode()
    except OSError:
        return -1
    line = next((line for line in body.splitlines() if line.startswith("tierflow_router_live_nodes ")), None)
    return int(float(line.split()[1])) if line else -1


async def _routers_hear(ctx: Ctx, decode_nodes: int, timeout: float) -> float | None:
    """Seconds until every router counts `decode_nodes` live decode nodes (None: not in `timeout`)."""
    started = time.monotonic()
    ports = [p for c in ctx.fabric.children() if c.role == "router" and (p := _metrics_port(c.pid))]
    while time.monotonic() - started < timeout:
        counts = [await _live_nodes(ctx.fabric, port) for port in ports]
        if ports and all(n >= decode_nodes for n in counts):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


async def _registry_call(fabric: Fabric, call: Callable[[ModelRegistryStub], Awaitable[Any]], timeout: float) -> float | None:
    """Retry `call` until the registry acknowledges it; the wall clock of that, or None."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"{fabric.host}:{fabric.registry_grpc_port}") as channel:
        stub = ModelRegistryStub(channel)
        while time.monotonic() < deadline:
            try:
                await call(stub)
                return time.time()
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    return None


async def nats_outage(ctx: Ctx) -> Injection:
    """SIGSTOP every NATS member for 5 s; then time the nodes and the routers' watch."""
    members = [m.name for m in ctx.fabric.nats_members()]
    nodes = [h for h in ctx.watch.live()]
    ctx.say(f"  SIGSTOP {', '.join(members)} ({len(nodes)} nodes live)")
    stopped = time.time()
    for name in members:
        signal_child(ctx.fabric, name, signal.SIGSTOP)
    try:
        await asyncio.sleep(NATS_STOP_S)
    finally:
        for name in members:
            signal_child(ctx.fabric, name, signal.SIGCONT)
    resumed = time.time()
    ctx.say(f"  SIGCONT after {resumed - stopped:.1f}s")

    async def node_back(node: Heard) -> tuple[str, float | None]:
        while time.time() - resumed < 30:
            if await ctx.watch.probe(node, timeout=3.0):
                return node.node_id, time.time() - resumed
            await asyncio.sleep(0.2)
        return node.node_id, None

    async def watch_check() -> tuple[float | None, list[VersionProbe]]:
        # The probes show the version that *served* a call: a router that picked v2 but
        # has not heard the v2 node again yet falls back to v1. So the change is made once
        # every router hears every decode node again: from then on, what the probes show
        # is the registry watch alone (one still down would never deliver the change).
        decode_nodes = sum(1 for n in nodes if n.role == "decode")
        heard = await _routers_hear(ctx, decode_nodes, 10.0)  # past 10 s that is a failure of its own: change anyway
        facts["routers_hear_every_node_s"] = None if heard is None else round(time.time() - resumed, 2)
        acked = await _registry_call(ctx.fabric, lambda s: s.Rollout(pb.RolloutRequest(model=WATCH_MODEL, version=WATCH_VERSION, weight=50), timeout=2), 30)
        probes: list[VersionProbe] = []
        if acked is not None:
            ctx.say(f"  rollout {WATCH_MODEL} {WATCH_VERSION} 50% acknowledged {acked - resumed:.1f}s after SIGCONT")
            # One probe every 25 ms, not waiting for answers: a probe's send time is what
            # bounds when its router had the change, so the cadence is the resolution.
            pending = []
            n = 0
            while time.time() - acked < PROBE_S:
                pending.append(asyncio.create_task(_version_probe(ctx.fabric, n)))
                n += 1
                await asyncio.sleep(PROBE_EVERY_S)
            probes = list(await asyncio.gather(*pending))
        await _registry_call(ctx.fabric, lambda s: s.Rollback(pb.RollbackRequest(model=WATCH_MODEL), timeout=2), 30)
        return acked, probes

    facts: dict[str, Any] = {"stopped_at": stopped}
    results, (acked, probes) = await asyncio.gather(asyncio.gather(*(node_back(n) for n in nodes)), watch_check())
    serving = dict(results)
    slow = {k: v for k, v in serving.items() if v is None or v > 10}
    ctx.say(f"  nodes serving again: {sum(v is not None for v in serving.values())}/{len(serving)}, slowest "
            f"{max((v for v in serving.values() if v is not None), default=0):.1f}s" + (f"; late or never: {slow}" if slow else ""))  # fmt: skip
    facts["nodes_serving_s"] = serving
    return Injection("nats (all members)", f"SIGSTOP {NATS_STOP_S:g}s", resumed, None, facts, probes, acked)


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("decode", "kill -9 a decode node", "kill", kill_decode),
    Fault("prefill", "kill -9 a prefill node", "kill", kill_prefill),
    Fault("router", "kill -9 a router", "kill", kill_router),
    Fault("registry", "kill -9 the registry", "kill", kill_registry),
    Fault("autoscaler", "kill -9 the autoscaler", "kill", kill_autoscaler),
    Fault("nats-member", "kill -9 one NATS member", "kill", kill_nats_member),
    Fault("stall-decode", "SIGSTOP a decode node 3 s", "stall", stall_decode),
    Fault("nats-outage", "SIGSTOP all NATS 5 s", "outage", nats_outage),
)}  # fmt: skip
