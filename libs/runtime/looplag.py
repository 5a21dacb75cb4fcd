"""How late the event loop runs what is due: every service's own stall detector.

A coroutine that holds the loop (a big prompt tokenized in one go, a large JSON body, a
GC pause) delays everything else in the process: other streams' tokens, heartbeats,
liveness timers. The monitor asks to be woken every `interval` and records how late it
woke; a healthy loop is late by well under a millisecond. `tierflow_event_loop_lag_seconds`
is what to look at when a service is slow for no visible reason.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["watch_loop_lag"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


async def watch_loop_lag(registry: CollectorRegistry, stopping: asyncio.Event, *, interval: float = 0.05) -> None:
    """Until `stopping`: sleep `interval`, observe how much later than asked the loop woke us."""
    lag = Histogram("tierflow_event_loop_lag_seconds", "How late the event loop woke a timer (its stalls)", buckets=_BUCKETS, registry=registry)
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        asked = loop.time() + interval
        await asyncio.sleep(interval)
        lag.observe(max(0.0, loop.time() - asked))
