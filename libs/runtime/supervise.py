"""Long-lived loops that outlive their failures: log, back off, resume.

Every service runs a few loops for its whole life (a node's engine and heartbeat, a
router's housekeeping, every KV watch). An exception escaping one of them used to end
it silently while the process lived on: a node that heartbeats but never answers is
worse than a dead one. `supervised` runs such a loop, and when it raises (a NATS
outage's `OutboundBufferLimitError`, a server restarting under a request, a bug) logs
it with its traceback, waits a backoff that grows while failures repeat, and starts it
again, until the service stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tierflow.runtime.waiting import first

__all__ = ["supervised", "Backoff"]

log = logging.getLogger(__name__)


class Backoff:
    """Delays that double from `initial` to `maximum`; `reset()` after a good run."""

    __slots__ = ("initial", "maximum", "_next")

    def __init__(self, initial: float = 0.1, maximum: float = 2.0) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.initial


async def supervised(
    name: str,
    loop: Callable[[], Awaitable[object]],
    stopping: asyncio.Event,
    *,
    backoff: Backoff | None = None,
    healthy_after: float = 10.0,
    on_failure: Callable[[BaseException], None] | None = None,
) -> None:
    """Run `loop()` until `stopping` is set, restarting it whenever it raises or returns.

    A loop that ran `healthy_after` seconds before failing starts again at the initial
    backoff; one that keeps failing waits longer each time (to `backoff.maximum`).
    Cancellation is never swallowed: cancelling the supervisor cancels the loop.
    """
    backoff = backoff or Backoff()
    clock = asyncio.get_running_loop().time
    while not stopping.is_set():
        began = clock()
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stopping.is_set():
                return
            if clock() - began >= healthy_after:
                backoff.reset()
            delay = backoff.next()
            log.error("%s failed (%s: %s); restarting in %.2fs", name, type(exc).__name__, exc, delay, exc_info=True,
                      extra={"fields": {"loop": name, "error": type(exc).__name__, "restart_in": delay}})  # fmt: skip
            if on_failure is not None:
                on_failure(exc)
            await first(stopping.wait(), timeout=delay)
            continue
        if stopping.is_set():
            return
        # A loop is meant to run until `stopping`; returning early is a bug worth a line.
        delay = backoff.next()
        log.warning("%s returned before the service stopped; restarting in %.2fs", name, delay)
        await first(stopping.wait(), timeout=delay)
