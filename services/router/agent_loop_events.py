"""Agent-loop events onto NATS, off the request path.

The dispatcher calls `note(event)` (no I/O: the event joins a bounded queue) when a
session is first flagged or capped (tierflow.placement.agent_loops); one task publishes
the queue on `tierflow.events.agent_loop.<tenant>` and ends when it is empty. Events are
rare (at most two per session), so the bound only matters when NATS is slow or gone:
what cannot be queued or sent is counted in `dropped`, and the request records (the
`agent_loop` field) still say it all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from tierflow.contracts import events, subjects

__all__ = ["AgentLoopEvents"]

log = logging.getLogger(__name__)


class AgentLoopEvents:
    def __init__(self, nc: Any, router_id: str, *, limit: int = 1000) -> None:
        self._nc = nc  # nats.aio.client.Client (anything with `async publish(subject, data)`)
        self._id = router_id
        self._limit = limit
        self._queue: deque[events.AgentLoopEvent] = deque()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.published = 0
        self.dropped = 0

    def note(self, event: events.AgentLoopEvent) -> None:
        """Queue `event` for publishing (called on the request path: never waits)."""
        if len(self._queue) >= self._limit:
            self.dropped += 1
            return
        event.router_id = self._id
        self._queue.append(event)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send(), name="agent-loop-events")

    async def _send(self) -> None:
        while self._queue:
            event = self._queue.popleft()
            try:
                await self._nc.publish(subjects.agent_loop_events(event.tenant), events.encoder.encode(event))
            except Exception as exc:  # the connection is closed (nats-py buffers while it reconnects)
                self.dropped += 1
                if not self._failing:
                    log.warning("router %s cannot publish agent-loop events (%s: %s)", self._id, type(exc).__name__, exc)
                self._failing = True
                continue
            self._failing = False
            self.published += 1

    async def close(self) -> None:
        """Publish what is queued (a moment at most), then stop."""
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=1.0)
            except (TimeoutError, asyncio.TimeoutError):
                self._task.cancel()
