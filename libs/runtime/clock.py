"""Time as a dependency, so the same policy code runs live and in virtual time.

Library code never reads the wall clock or sleeps; it is handed a `Clock`. Services
pass `WallClock()`, the simulator a `VirtualClock` it advances itself.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["Clock", "WallClock", "VirtualClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (for records people read)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for every duration)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class WallClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """A clock that moves only when `advance` is called; sleepers wake in time order."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._ids), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward, waking (in order) every sleeper whose time has come."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
