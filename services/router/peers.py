"""The router's side of living with other routers: presence, peer count, gossip.

Routers share nothing but NATS, and a client's next request may reach any of them
(`tierflow up --routers N` puts N behind one port). So each router:

- announces itself every `interval` (`RouterPresence`), which nodes use to drop the
  streams of a router that died and routers use to count each other (tenant limits and
  admission are split 1/N), and says goodbye on a clean stop;
- batches what the others should know, a few times a second (`RouterGossip`): the node
  each session last ran on (so a session keeps its node, its prefix cache, whichever
  router it reaches) and the nodes it just found failing (so the others stop placing on
  them now, not three heartbeats later).

Nothing here is on a request's path: the dispatcher only drops a note into a dict.
Anything lost (a router restarts, a message is dropped) is rebuilt: sessions from the
next requests and the nodes' prefix hashes, suspects from the next failure.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from tierflow.contracts import messages, subjects
from tierflow.placement import SessionTable
from tierflow.placement.tables import NodeTable
from tierflow.runtime.clock import Clock
from tierflow.runtime.waiting import first

__all__ = ["RouterPeers"]

log = logging.getLogger(__name__)
_encode = messages.encoder.encode
_MAX_SESSIONS_PER_MESSAGE = 2000  # ~100 KB: well under NATS's default 1 MB payload limit


class RouterPeers:
    def __init__(
        self, nc: NATS, router_id: str, clock: Clock, *, sessions: SessionTable, nodes: NodeTable,
        interval: float = 1.0, gossip_every: float = 0.1,
    ) -> None:
        self._nc = nc
        self._id = router_id
        self._clock = clock
        self._sessions = sessions
        self._nodes = nodes
        self.interval = interval
        self._gossip_every = gossip_every
        self._heard: dict[str, float] = {}
        self._sessions_out: dict[str, str] = {}
        self._suspects_out: set[str] = set()
        self._subs: list[Any] = []
        self._failing = False

    # -- what the dispatcher tells us (no I/O: flushed by `run`)
    def note_session(self, session: str, node: str) -> None:
        self._sessions_out[session] = node

    def note_suspect(self, node: str) -> None:
        self._suspects_out.add(node)

    def count(self) -> int:
        """Routers alive now, this one included: heard within three intervals."""
        horizon = self._clock.monotonic() - 3 * self.interval
        return 1 + sum(1 for at in self._heard.values() if at >= horizon)

    # -- the wire
    async def start(self) -> None:
        self._subs = [
            await self._nc.subscribe(subjects.ROUTER_PRESENCE, cb=self._on_presence),
            await self._nc.subscribe(subjects.ROUTER_GOSSIP, cb=self._on_gossip),
        ]

    async def _on_presence(self, msg: Any) -> None:
        try:
            presence = messages.presence_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if presence.router_id == self._id:
            return
        if presence.leaving:
            self._heard.pop(presence.router_id, None)
        else:
            self._heard[presence.router_id] = self._clock.monotonic()

    async def _on_gossip(self, msg: Any) -> None:
        try:
            gossip = messages.gossip_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("bad gossip on %s: %s", msg.subject, exc)
            return
        if gossip.router_id == self._id:
            return
        for session, node in gossip.sessions:
            self._sessions.learn(session, node)
        now = self._clock.monotonic()
        for node in gossip.suspects:
            self._nodes.mark_suspect(node, now)

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self._nc.publish(subject, data)
        except Exception as exc:  # NATS down: the next round says it again
            if not self._failing:
                log.warning("router %s cannot reach its peers (%s: %s)", self._id, type(exc).__name__, exc)
            self._failing = True
        else:
            self._failing = False

    async def _flush(self) -> None:
        if self._suspects_out or self._sessions_out:
            sessions = list(self._sessions_out.items())
            suspects = sorted(self._suspects_out)
            self._sessions_out, self._suspects_out = {}, set()
            for i in range(0, max(1, len(sessions)), _MAX_SESSIONS_PER_MESSAGE):
                gossip = messages.RouterGossip(router_id=self._id, sessions=sessions[i : i + _MAX_SESSIONS_PER_MESSAGE], suspects=suspects if i == 0 else [])
                await self._publish(subjects.router_gossip(self._id), _encode(gossip))

    async def run(self, stopping: asyncio.Event) -> None:
        """Presence every `interval`, gossip every `gossip_every` (when there is any)."""
        presence = _encode(messages.RouterPresence(router_id=self._id, interval_s=self.interval))
        subject = subjects.router_presence(self._id)
        next_presence = 0.0
        while not stopping.is_set():
            now = self._clock.monotonic()
            if now >= next_presence:
                await self._publish(subject, presence)
                next_presence = now + self.interval
            await self._flush()
            await first(stopping.wait(), timeout=self._gossip_every)

    async def close(self) -> None:
        """Say goodbye (peers stop counting this router at once) and unsubscribe."""
        await self._flush()
        await self._publish(subjects.router_presence(self._id), _encode(messages.RouterPresence(router_id=self._id, interval_s=self.interval, leaving=True)))
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be closing already
                pass
