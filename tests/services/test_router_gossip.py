"""Routers tell each other what a request's next router needs: where each session ran,
which nodes just failed, and that they are alive (peer count), over a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest

from tierflow.contracts import messages
from tierflow.placement import SessionTable
from tierflow.placement.tables import NodeTable
from tierflow.runtime.clock import WallClock
from tierflow.services.router.peers import RouterPeers

pytestmark = pytest.mark.timeout(60)


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_sessions_suspects_and_presence_reach_the_other_router(nats_url: str) -> None:
    clock = WallClock()
    ncs = [await nats.connect(nats_url) for _ in range(2)]
    tables = [(SessionTable(100), NodeTable()) for _ in range(2)]
    for _, nodes in tables:
        nodes.apply(messages.NodeHeartbeat(node_id="n1", models=[messages.ModelState(name="m")], started_at=1.0), clock.monotonic())
    peers = [RouterPeers(nc, f"gossip-r{i}", clock, sessions=s, nodes=n, interval=0.2, gossip_every=0.05) for i, (nc, (s, n)) in enumerate(zip(ncs, tables))]
    stops = [asyncio.Event(), asyncio.Event()]
    for p in peers:
        await p.start()
    runs = [asyncio.create_task(p.run(stop)) for p, stop in zip(peers, stops)]
    try:
        await _until(lambda: all(p.count() == 2 for p in peers))
        peers[0].note_session("acme/s1", "n1")
        peers[0].note_suspect("n1")
        b_sessions, b_nodes = tables[1]
        await _until(lambda: b_sessions.last_node("acme/s1") == "n1")
        await _until(lambda: b_nodes.get("n1").suspect_until > clock.monotonic())  # type: ignore[union-attr]
        assert b_sessions.get("acme/s1").requests == 0  # learned, not counted as a request there  # type: ignore[union-attr]
        # A clean stop says goodbye: the other router counts itself alone at once
        # (not after three silent intervals).
        stops[1].set()
        await runs[1]
        await peers[1].close()
        await _until(lambda: peers[0].count() == 1, timeout=0.3)
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*runs)
        await peers[0].close()
        for nc in ncs:
            await nc.close()
