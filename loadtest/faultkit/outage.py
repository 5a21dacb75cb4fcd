"""The NATS outage: every member stopped for 5 s, and what the issue asks after it.

It stops *every* member with SIGSTOP for 5 s, then SIGCONT. Not SIGKILL and restart: a
killed member is restarted by `tierflow up` after its own backoff (0.5 s, then 1 s,
...), so the outage would last whatever that takes, not 5 s; and a stopped server is the
harder case for clients, since their TCP connections stay open and no reset tells them
anything: they must notice the silence themselves (pings, liveness, stalled watches).
It is also what a network partition or a frozen VM looks like.

Right after SIGCONT it measures: every node answers a request sent straight to it
within 10 s (`NodeWatch.probe`); every router hears every decode node again within 10 s
(each router's `tierflow_router_live_nodes`, on its own metrics port); and a registry
change made as soon as the registry takes it reaches every router within 2 s.

The change is one the routers show whatever the nodes do: the fleet's `watch-probe`
model is deployed on no node, and the change moves its bundle's configuration from
ss8192 to ss16384 (a fleet `Apply`), so `GET /v1/models/watch-probe` answers
`max_model_len` 16384 on a router once its watch has delivered it. (A version rollout
would show in `x-tierflow-model-version` only once the router also hears the new
version's node, and a node marked suspect during the outage stays out for a heartbeat
or two: that times the heartbeats, not the watch.) Sixteen keep-alive connections ask
every 25 ms from before the change; SO_REUSEPORT pins each to one router, and one
completion sent on each at the end names it (its `x-request-id` in that router's log).
The routers' own "watch ... resumed" log lines (seconds after SIGCONT) are judged
beside it. The change is undone afterwards.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import grpc

from tierflow.harness import Fabric
from tierflow.runtime.admin_token import admin_metadata, find_admin_token
from tierflow.runtime.nats_server import http_get
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1.registry_pb2_grpc import ModelRegistryStub

from .base import ConnectionProbe, Ctx, Injection
from .fabric import FLEET, Heard, signal_child

__all__ = ["NATS_STOP_S", "WATCH_MODEL", "WATCH_TO", "nats_outage"]

NATS_STOP_S = 5.0
WATCH_MODEL = "watch-probe"  # deployed on no node (loadtest/fleets/faults.yaml)
WATCH_FROM, WATCH_TO = "ss8192-bs4", "ss16384-bs4"  # its bundle's configuration, before and after the change
WATCH_CONNECTIONS = 16  # P(all on one of two routers) = 2**-15
NAMING_MODEL = "planner"  # the completion that names a connection's router
NAMING_ATTEMPTS = 20
PROBE_S = 5.0  # how long the routers are asked after the change
PROBE_EVERY_S = 0.025


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a content-length body (what the router sends unstreamed)."""
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _watch_connection(fabric: Fabric, stop: asyncio.Event) -> ConnectionProbe:
    """Ask one router (whichever this connection lands on) for WATCH_MODEL's context every
    PROBE_EVERY_S until `stop`; then name the router with one completion."""
    probe = ConnectionProbe()
    host = f"Host: {fabric.host}\r\n".encode()
    try:
        async with asyncio.timeout(PROBE_S + 90):
            reader, writer = await asyncio.open_connection(fabric.host, fabric.http_port)
            try:
                while not stop.is_set():
                    sent = time.time()
                    writer.write(b"GET /v1/models/" + WATCH_MODEL.encode() + b" HTTP/1.1\r\n" + host + b"\r\n")
                    status, _, body = await _read_response(reader)
                    if status == 200:
                        probe.samples.append((sent, int(json.loads(body)["max_model_len"])))
                    await asyncio.sleep(PROBE_EVERY_S)
                # Only a 200 carries x-request-id: under load the naming call may be refused
                # (429/503); it is asked again, as the refusal's Retry-After says, a while.
                body = json.dumps({"model": NAMING_MODEL, "prompt": "which router?", "max_tokens": 1}).encode()
                for _ in range(NAMING_ATTEMPTS):
                    writer.write(b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
                    status, headers, _ = await _read_response(reader)
                    if status == 200:
                        probe.request_id = headers.get("x-request-id", "")
                        break
                    await asyncio.sleep(min(2.0, float(headers.get("retry-after", "0.5"))))
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError, IndexError, KeyError, asyncio.IncompleteReadError):
        pass  # a connection that broke tells nothing; the others do
    return probe


def _fleet_with(config: str) -> str:
    """The suite's fleet file with WATCH_MODEL's bundle entry in `config`."""
    text = FLEET.read_text()
    entry = f"{{model: {WATCH_MODEL}, config: {WATCH_FROM}}}"
    if entry not in text:
        raise RuntimeError(f"{FLEET} has no bundle entry {entry}: the outage's registry change needs it")
    return text.replace(entry, f"{{model: {WATCH_MODEL}, config: {config}}}")


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


async def _apply(fabric: Fabric, fleet_yaml: str, timeout: float) -> float | None:
    """Apply `fleet_yaml`, retried until the registry acknowledges it; the wall clock of that, or None."""
    deadline = time.monotonic() + timeout
    metadata = admin_metadata(find_admin_token("", fabric.data_dir))  # an Apply needs the registry's admin token
    async with grpc.aio.insecure_channel(f"{fabric.host}:{fabric.registry_grpc_port}") as channel:
        stub = ModelRegistryStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Apply(pb.ApplyRequest(fleet_yaml=fleet_yaml, source="faults-outage"), timeout=2, metadata=metadata)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
                continue
            if reply.problems:
                raise RuntimeError("the outage's fleet change was refused: " + "; ".join(reply.problems))
            return time.time()
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

    async def routers_hear() -> None:
        decode_nodes = sum(1 for n in nodes if n.role == "decode")
        heard = await _routers_hear(ctx, decode_nodes, 10.0)
        facts["routers_hear_every_node_s"] = None if heard is None else round(time.time() - resumed, 2)

    async def watch_check() -> tuple[float | None, list[ConnectionProbe]]:
        stop = asyncio.Event()
        connections = [asyncio.create_task(_watch_connection(ctx.fabric, stop)) for _ in range(WATCH_CONNECTIONS)]
        acked = await _apply(ctx.fabric, _fleet_with(WATCH_TO), 30)
        if acked is not None:
            ctx.say(f"  registry change ({WATCH_MODEL} {WATCH_FROM} -> {WATCH_TO}) acknowledged {acked - resumed:.1f}s after SIGCONT")
            await asyncio.sleep(PROBE_S)
        stop.set()
        probes = list(await asyncio.gather(*connections))
        await _apply(ctx.fabric, _fleet_with(WATCH_FROM), 30)
        return acked, probes

    facts: dict[str, Any] = {"stopped_at": stopped, "routers": sum(1 for c in ctx.fabric.children() if c.role == "router")}
    results, (acked, probes), _ = await asyncio.gather(asyncio.gather(*(node_back(n) for n in nodes)), watch_check(), routers_hear())
    serving = dict(results)
    slow = {k: v for k, v in serving.items() if v is None or v > 10}
    ctx.say(f"  nodes serving again: {sum(v is not None for v in serving.values())}/{len(serving)}, slowest "
            f"{max((v for v in serving.values() if v is not None), default=0):.1f}s" + (f"; late or never: {slow}" if slow else ""))  # fmt: skip
    facts["nodes_serving_s"] = serving
    return Injection("nats (all members)", f"SIGSTOP {NATS_STOP_S:g}s", resumed, None, facts, probes, acked)
