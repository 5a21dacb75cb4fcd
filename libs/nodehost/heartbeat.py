"""A node's heartbeat: the engine's snapshot, published every interval.

The router places by it and the autoscaler scales by it; a node that stops sending it
is out of rotation after three intervals.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

from tierflow.contracts import messages, subjects
from tierflow.nodehost.driver import EngineDriver
from tierflow.runtime.clock import Clock

__all__ = ["NodeIdentity", "heartbeat_message", "heartbeat_loop"]


@dataclass(slots=True)
class NodeIdentity:
    node_id: str
    role: str
    deployment: str
    region: str
    residency: str
    profile: str
    started_at: float = field(default_factory=time.time)
    cordoned: bool = False
    draining: bool = False


def heartbeat_message(identity: NodeIdentity, driver: EngineDriver, clock: Clock, seq: int, interval: float) -> messages.NodeHeartbeat:
    """The engine's snapshot plus the driver's latency and load report."""
    now = clock.monotonic()
    snap = driver.engine.snapshot(now)
    report = driver.load_report(now)
    return messages.NodeHeartbeat(
        node_id=identity.node_id,
        role=identity.role,  # type: ignore[arg-type]
        deployment=identity.deployment,
        region=identity.region,
        residency=identity.residency,
        profile=identity.profile,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=identity.started_at,
        sent_at=clock.now(),
        interval_s=interval,
        seq=seq,
        models=[
            messages.ModelState(
                name=m.name, version=m.version, tier=m.tier, in_flight=m.in_flight, queued=m.queued,
                max_batch=m.max_batch, recent_prefix_hashes=list(m.recent_prefix_hashes),
            )
            for m in snap.models
        ],
        block_size=snap.block_size,
        queue_depth=snap.queue_depth,
        running=snap.running,
        max_batch=snap.max_batch,
        kv_usage=snap.kv_usage,
        prefix_cache_blocks=snap.prefix_cache_blocks.hbm + snap.prefix_cache_blocks.ddr,
        # node-wide list left empty: the per-model lists above say the same, more precisely
        cordoned=identity.cordoned,
        draining=identity.draining,
        ttft_p95=report.ttft_p95,
        itl_p95=report.itl_p95,
        latency_samples=report.latency_samples,
        latency_window_s=report.latency_window,
        in_flight=report.in_flight,
        queued_prompt_tokens=report.queued_prompt_tokens,
    )


async def heartbeat_loop(
    nc: NATS, identity: NodeIdentity, driver: EngineDriver, clock: Clock, interval: float, stopping: asyncio.Event, beat_now: asyncio.Event
) -> None:
    """Beat every `interval`, and at once when `beat_now` is set (a state change the
    router must see before it places the next request)."""
    subject = subjects.node_heartbeat(identity.node_id)
    seq = 0
    while not stopping.is_set():
        seq += 1
        beat_now.clear()
        await nc.publish(subject, messages.encoder.encode(heartbeat_message(identity, driver, clock, seq, interval)))
        stop = asyncio.ensure_future(stopping.wait())
        now = asyncio.ensure_future(beat_now.wait())
        await asyncio.wait((stop, now), timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        now.cancel()
