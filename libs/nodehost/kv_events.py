"""A node's KV-cache events, batched for the routers' prefix index (issue 17).

The engine's KV cache logs what changes (`NodeEngine.drain_kv_events`); `KvEventFeed`
(pure, shared with the fleet simulator) turns each drain into `messages.KvEvents`,
numbered 1, 2, 3, ... from the node's start so a router notices one it missed, and split
so no message carries more than `MAX_KV_EVENT_HASHES` hashes. It sends a full snapshot
(`snapshot=True`, then plain changes for what did not fit) when:

- the node starts (a router that joins later asks for one: it cannot know the node
  until it has one);
- a router asks (`subjects.node_kv_sync`: it saw a gap), at most once per
  `min_snapshot_gap` seconds however many ask, and every router gets it;
- every `snapshot_every` seconds (a router that missed the last message of a burst
  sees no gap until the next message: the periodic snapshot bounds how long it can be
  wrong); 0 turns that off;
- the cache's log overflowed (nobody drained it for long: `KvChanges.lost`), or a
  publish failed (its message is lost: the routers will see the gap anyway).

`kv_events_loop` is the process's side: a poll every `interval` (~50 ms), so a router
learns of a prompt's blocks within about that long of the prompt's prefill.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Protocol

from nats.aio.client import Client as NATS
from tierflow.contracts import messages, subjects
from tierflow.contracts.messages import MAX_KV_EVENT_HASHES, KvEvents, ModelKvEvents
from tierflow.rdu.kvcache import KvChanges
from tierflow.runtime.clock import Clock
from tierflow.runtime.waiting import first

__all__ = ["KvEventFeed", "KvSource", "kv_events_loop"]

log = logging.getLogger(__name__)

_KINDS = ("stored", "spilled", "restored", "removed")


class KvSource(Protocol):
    """What the feed reads: a `NodeEngine` built with `kv_events=True`."""

    def drain_kv_events(self) -> KvChanges: ...

    def kv_held(self) -> dict[str, tuple[list[int], list[int]]]: ...


class KvEventFeed:
    """A node's stream of `KvEvents`: sequence numbers, batching, snapshots (module docstring)."""

    def __init__(
        self,
        node_id: str,
        started_at: float,
        *,
        snapshot_every: float = 30.0,
        min_snapshot_gap: float = 1.0,
        max_hashes: int = MAX_KV_EVENT_HASHES,
    ) -> None:
        self.node_id = node_id
        self.started_at = started_at
        self.seq = 0
        self.snapshots = 0
        self._snapshot_every = snapshot_every
        self._min_gap = min_snapshot_gap
        self._max_hashes = max_hashes
        self._wanted = True  # the first poll sends one
        self._last_snapshot = float("-inf")
        self._next_periodic = float("inf")

    def request_snapshot(self) -> None:
        """A router asked for one (or a message was lost): sent at the next poll the gap allows."""
        self._wanted = True

    def poll(self, source: KvSource, now: float) -> list[KvEvents]:
        """The messages to publish now (none when nothing changed)."""
        changes = source.drain_kv_events()
        due = (
            changes.lost
            or now >= self._next_periodic
            or (self._wanted and now - self._last_snapshot >= self._min_gap)
        )
        if due:
            return self._snapshot(source.kv_held(), now)
        return self._number(self._pieces(changes), snapshot=False)

    def _snapshot(
        self, held: dict[str, tuple[list[int], list[int]]], now: float
    ) -> list[KvEvents]:
        self._wanted = False
        self._last_snapshot = now
        if self._snapshot_every > 0:
            self._next_periodic = now + self._snapshot_every
        self.snapshots += 1
        in_hbm = ((m, "stored", hbm) for m, (hbm, _) in held.items())
        in_ddr = ((m, "spilled", ddr) for m, (_, ddr) in held.items())
        return self._number(self._pieces_of(in_hbm, in_ddr), snapshot=True)

    def _pieces(self, changes: KvChanges) -> list[list[ModelKvEvents]]:
        return self._pieces_of(
            (
                (m, kind, getattr(c, kind))
                for m, c in changes.models.items()
                for kind in _KINDS
            )
        )

    def _pieces_of(
        self, *lists: Iterator[tuple[str, str, list[int]]]
    ) -> list[list[ModelKvEvents]]:
        """The (model, kind, hashes) lists packed into messages of at most `max_hashes`."""
        messages_: list[list[ModelKvEvents]] = []
        current: dict[str, ModelKvEvents] = {}
        room = self._max_hashes
        for group in lists:
            for model, kind, hashes in group:
                start = 0
                while start < len(hashes):
                    if room == 0:
                        messages_.append(list(current.values()))
                        current, room = {}, self._max_hashes
                    piece = hashes[start : start + room]
                    entry = current.get(model)
                    if entry is None:
                        entry = current[model] = ModelKvEvents(name=model)
                    getattr(entry, kind).extend(piece)
                    start += len(piece)
                    room -= len(piece)
        if current:
            messages_.append(list(current.values()))
        return messages_

    def _number(
        self, pieces: list[list[ModelKvEvents]], *, snapshot: bool
    ) -> list[KvEvents]:
        if snapshot and not pieces:
            pieces = [[]]  # an empty cache is a snapshot too
        out = []
        for i, models in enumerate(pieces):
            self.seq += 1
            out.append(
                KvEvents(
                    node_id=self.node_id,
                    seq=self.seq,
                    started_at=self.started_at,
                    snapshot=snapshot and i == 0,
                    models=models,
                )
            )
        return out


async def kv_events_loop(
    nc: NATS,
    feed: KvEventFeed,
    source: KvSource,
    clock: Clock,
    interval: float,
    stopping: asyncio.Event,
) -> None:
    """Publish the feed's messages every `interval` until `stopping`."""
    subject = subjects.node_kv_events(feed.node_id)
    encode = messages.encoder.encode
    failing = False
    while not stopping.is_set():
        for message in feed.poll(source, clock.monotonic()):
            try:
                await nc.publish(subject, encode(message))
            except Exception as exc:  # noqa: BLE001 - lost: the routers see a gap; the next poll sends a snapshot
                feed.request_snapshot()
                if not failing:
                    log.warning(
                        "KV events not sent (%s: %s); a snapshot follows once they flow",
                        type(exc).__name__,
                        exc,
                    )
                failing = True
                break
            else:
                failing = False
        await first(stopping.wait(), timeout=interval)
