"""The NATS outage: every member stopped for 5 s, and what the issue asks after it.

It stops *every* member with SIGSTOP for 5 s, then SIGCONT. Not SIGKILL and restart: a
killed member is restarted by `tierflow up` after its own backoff (0.5 s, then 1 s,
...), so the outage would last whatever that takes, not 5 s; and a stopped server is the
harder case for clients, since their TCP connections stay open and no reset tells them
anything: they must notice the silence themselves (pings, liveness, stalled watches).
It is also what a network partition or a frozen VM looks like.

Right after SIGCONT it measures: every node answers a request sent straight to it
within 10 s (`NodeWatch.probe`); every router hears every decode node again (each
router's `tierflow_router_live_nodes`, on its own metrics port); and a registry change
(a planner v2 rollout at 50%) reaches both routers within 2 s, seen in the
`x-tierflow-model-version` of requests spread over both (a fresh connection each:
SO_REUSEPORT spreads connections, not requests; which router answered each is read from
the routers' logs afterwards). The change is made once every router hears every decode
node again (at most 10 s, when that is a failure of its own): the header names the
version that *served* the call, and a router that picked v2 before it heard the v2 node
again falls back to v1, which would time the heartbeats, not the watch. The routers' own
"watch ... resumed" log lines (seconds after SIGCONT) are judged beside it: a watch that
came back late shows there even when the change was made after it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from tierflow.harness import Fabric
from tierflow.runtime.nats_server import http_get
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1.registry_pb2_grpc import ModelRegistryStub

from .base import Ctx, Injection, VersionProbe
from .fabric import Heard, signal_child

__all__ = ["NATS_STOP_S", "WATCH_MODEL", "WATCH_VERSION", "nats_outage"]

NATS_STOP_S = 5.0
WATCH_MODEL = "planner"  # the model whose v2 rollout times the routers' registry watch
WATCH_VERSION = "v2"
PROBE_S = 5.0  # how long the routers are probed after the change
PROBE_EVERY_S = 0.025


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
