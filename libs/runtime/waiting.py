"""Waiting for whichever comes first: work, a wake-up event, or the stop.

Service loops sleep until their next tick *or* a stop, or until a change *or* a stop;
this is that wait, once, with the losers cancelled so no waiter outlives its loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

__all__ = ["first"]


async def first(*awaitables: Awaitable[object], timeout: float | None = None) -> None:
    """Return when any of `awaitables` is done (or after `timeout`); cancel the others."""
    futures = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()
