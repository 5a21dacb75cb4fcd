"""The kills and the stall: whom to hurt, the signal, and when the victim is back at work.

For a kill, `tierflow up` restarts the process (`wait_back` sees the new pid), and
"back" means it does its job again: a node beats (under its new pid), a router, the
registry or the autoscaler answers NATS service discovery (its new pid in the metadata),
a NATS member answers /healthz. Victims are chosen where a fault hurts most: the node
with the most streams running (its heartbeat says; for a prefill node the suite waits up
to 15 s for a heartbeat that has just shown one busy, since a prefill lasts about a
second), the NATS member with the most client connections (its /varz says).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import Any

from tierflow.contracts import subjects
from tierflow.harness import Fabric
from tierflow.runtime import discovery
from tierflow.runtime.nats_server import http_get

from .base import Ctx, Injection
from .fabric import Heard, NodeWatch, signal_child, wait_back

__all__ = ["kill_autoscaler", "kill_decode", "kill_nats_member", "kill_prefill", "kill_registry", "kill_router", "stall_decode"]

NODE_STOP_S = 3.0


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
