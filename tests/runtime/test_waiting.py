"""`first`: the earliest of several waits wins, and nothing it started is left running."""

from __future__ import annotations

import asyncio

from tierflow.runtime.waiting import first


async def test_the_first_done_returns_and_the_others_are_cancelled() -> None:
    wake, never = asyncio.Event(), asyncio.Event()
    started = asyncio.get_running_loop().time()
    asyncio.get_running_loop().call_soon(wake.set)
    before = len(asyncio.all_tasks())
    await first(wake.wait(), never.wait(), asyncio.sleep(30))
    await asyncio.sleep(0)  # let the cancellations land
    assert asyncio.get_running_loop().time() - started < 5 and len(asyncio.all_tasks()) == before


async def test_a_timeout_ends_the_wait_too() -> None:
    never = asyncio.Event()
    before = len(asyncio.all_tasks())
    await first(never.wait(), timeout=0.01)
    await asyncio.sleep(0)
    assert not never.is_set() and len(asyncio.all_tasks()) == before
