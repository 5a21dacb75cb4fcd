"""Slow headers, short form of loadtest/slow_headers.py: 200 sockets trickling a header
byte a second at the package's fabric (1 s header deadline) while a normal client keeps
calling. Each slow socket must be answered 408 and closed within deadline + 1 s, the
normal client must keep being served, and the router's open fds must stay bounded and
come back down."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tierflow.harness import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
from slow_headers import FdSampler, fd_count, normal_latencies, percentile, slow_sockets  # noqa: E402

pytestmark = pytest.mark.fabric

SOCKETS = 200


async def test_slow_header_sockets_are_closed_at_the_deadline_and_cost_nobody_else(fabric: Fabric, header_timeout: float) -> None:
    router = next(c for c in fabric.children() if c.role == "router")
    fds_before = fd_count(router.pid)
    stop = asyncio.Event()
    sampler = FdSampler(router.pid, period=0.1)
    sampling = asyncio.create_task(sampler.run(stop))
    slow = asyncio.create_task(slow_sockets(fabric.host, fabric.http_port, SOCKETS, sources=["127.0.0.1"], give_up_s=header_timeout + 5, ramp_s=0.2))
    await asyncio.sleep(0.2)
    during = await normal_latencies(fabric.base_url, "llama-3.1-8b", header_timeout, 2)
    results = await slow
    for _ in range(30):  # the clients closed: the router's sockets follow (at most its 2 s linger)
        if fd_count(router.pid) <= fds_before + 16:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await sampling

    late = [r for r in results if r.status != 408 or r.closed is None or r.closed > header_timeout + 1.0]
    assert not late, f"{len(late)} of {SOCKETS}: {late[:3]}"
    assert min(r.closed for r in results if r.closed is not None) >= header_timeout - 0.05  # not before the deadline either
    assert len(during) >= 5 and percentile(during, 0.99) < 1.0, during
    assert sampler.peak() <= fds_before + SOCKETS + 32, (fds_before, sampler.peak())
    assert fd_count(router.pid) <= fds_before + 16
    assert fabric.router_metric("tierflow_router_http_late_request_heads_total") >= SOCKETS
