"""A node's heartbeat: the engine's snapshot, published every interval.

The router places by it and the autoscaler scales by it; a node that stops sending it
is out of rotation after three intervals. What it says is `beat.build_heartbeat` (pure,
shared with the fleet simulator); this module adds the process's side and the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from nats.aio.client import Client as NATS

from tierflow.contracts import messages, subjects
from tierflow.nodehost.beat import NodeIdentity, build_heartbeat
from tierflow.nodehost.driver import EngineDriver
from tierflow.runtime.clock import Clock
from tierflow.runtime.waiting import first

__all__ = ["NodeIdentity", "heartbeat_message", "heartbeat_loop"]

log = logging.getLogger(__name__)


def heartbeat_message(identity: NodeIdentity, driver: EngineDriver, clock: Clock, seq: int, interval: float) -> messages.NodeHeartbeat:
    """This process's heartbeat now: `build_heartbeat` over the engine and the driver."""
    now = clock.monotonic()
    return build_heartbeat(
        identity, driver.engine.snapshot(now, node_hashes=False), driver.load_report(now),
        seq=seq, interval=interval, sent_at=clock.now(), host=socket.gethostname(), pid=os.getpid(),
    )


async def heartbeat_loop(
    nc: NATS, identity: NodeIdentity, driver: EngineDriver, clock: Clock, interval: float, stopping: asyncio.Event, beat_now: asyncio.Event
) -> None:
    """Beat every `interval`, and at once when `beat_now` is set (a state change the
    router must see before it places the next request)."""
    subject = subjects.node_heartbeat(identity.node_id)
    seq = 0
    failing = False
    while not stopping.is_set():
        seq += 1
        beat_now.clear()
        try:
            await nc.publish(subject, messages.encoder.encode(heartbeat_message(identity, driver, clock, seq, interval)))
        except Exception as exc:  # NATS down and the client's buffer full: beat again next interval
            if not failing:
                log.warning("heartbeat not sent (%s: %s); retrying every %gs", type(exc).__name__, exc, interval)
            failing = True
        else:
            if failing:
                log.info("heartbeats flow again")
            failing = False
        await first(stopping.wait(), beat_now.wait(), timeout=interval)
