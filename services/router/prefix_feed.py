"""The router's side of the nodes' KV events: subscribe, check, apply, ask for snapshots.

Nodes publish their KV cache's changes on `subjects.node_kv_events` (issue 17); this
shell feeds them to the pure `PrefixIndex`, which placement reads through
`NodeTable.prefix_sets`. A message is believed only from the node it names (the subject's
id token, which NATS permissions make unforgeable) and within the bounds of
`messages.KvEvents`. When the index reports a gap (or a node it has never had a snapshot
of), the router publishes a `KvSyncRequest` on `subjects.node_kv_sync(node)`; the node's
answer, a snapshot on its events subject, reaches every router. A node heard only by
its heartbeats (an idle node says nothing on its events subject: this router started
after its start snapshot) is asked too, at most every `ask_every` seconds. Nodes silent
for `forget_after` seconds (they send a snapshot every 30 s even when idle) are dropped.
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.aio.client import Client as NATS

from tierflow.contracts import messages, subjects
from tierflow.placement.prefix_index import PrefixIndex
from tierflow.runtime.clock import Clock

__all__ = ["PrefixFeed"]

log = logging.getLogger(__name__)


class PrefixFeed:
    """Keeps a `PrefixIndex` current from NATS."""

    def __init__(
        self,
        nc: NATS,
        router_id: str,
        clock: Clock,
        index: PrefixIndex,
        *,
        forget_after: float = 120.0,
        ask_every: float = 5.0,
    ) -> None:
        self._nc = nc
        self._clock = clock
        self.index = index
        self._forget_after = forget_after
        self._ask_every = ask_every
        self._asked_at: dict[str, float] = {}  # nodes asked because of a heartbeat
        self._sync = messages.encoder.encode(
            messages.KvSyncRequest(router_id=router_id)
        )
        self.rejected = 0
        self.asked = 0
        self._logged_at = 0.0

    async def start(self) -> None:
        await self._nc.subscribe(subjects.NODE_KV_EVENTS, cb=self._on_events)

    async def _on_events(self, msg: object) -> None:
        subject: str = msg.subject  # type: ignore[attr-defined]
        try:
            events = messages.kv_events_decoder.decode(msg.data)  # type: ignore[attr-defined]
        except msgspec.DecodeError as exc:
            self._reject(f"undecodable KV events on {subject}: {exc}")
            return
        if subjects.node_of_kv_events(subject) != events.node_id:
            self._reject(
                f"KV events for node {events.node_id!r} published on {subject!r}"
            )
            return
        try:
            ask = self.index.apply(events, self._clock.monotonic())
        except Exception:  # never let one message end the subscription's callbacks
            log.exception("applying the KV events of %s failed", events.node_id)
            return
        if ask:
            log.info(
                "KV events of node %s: missed some (seq %d); asking it for a snapshot",
                events.node_id,
                events.seq,
            )
            await self._ask(events.node_id)

    async def heard(self, node_id: str) -> None:
        """A node's heartbeat arrived: ask for its snapshot if its blocks are not known."""
        if self.index.knows(node_id):
            return
        now = self._clock.monotonic()
        if now - self._asked_at.get(node_id, float("-inf")) < self._ask_every:
            return
        self._asked_at[node_id] = now
        await self._ask(node_id)

    async def _ask(self, node_id: str) -> None:
        self.asked += 1
        try:
            await self._nc.publish(subjects.node_kv_sync(node_id), self._sync)
        except Exception as exc:  # noqa: BLE001 - asked again later
            log.warning("could not ask node %s for a KV snapshot: %s", node_id, exc)

    def _reject(self, detail: str) -> None:
        self.rejected += 1
        now = time.monotonic()
        if now - self._logged_at > 10.0:
            self._logged_at = now
            log.warning("%s (rejected, %d so far)", detail, self.rejected)

    def housekeeping(self, now: float) -> None:
        """Forget the nodes that fell silent."""
        self._asked_at = {
            n: t for n, t in self._asked_at.items() if now - t < self._forget_after
        }
        for node_id in self.index.forget_silent(now, self._forget_after):
            log.info(
                "forgot the KV blocks of node %s (silent for %.0fs)",
                node_id,
                self._forget_after,
            )
