"""The book of scale-downs under way: one `removal.<node>` record per node being removed.

    RemovalBook        begin / advance / adopt / end / pending   (a Protocol)
    KvRemovalBook      in JetStream KV (`subjects.AUTOSCALER_BUCKET`): survives the autoscaler
    MemoryRemovalBook  in a dict, same rules: for tests and shells without NATS

Every write is a compare-and-set on the revision the writer last saw: `begin` only
creates (a node is removed once), `advance`/`adopt`/`end` name the revision they
replace. An autoscaler that lost its lease and wakes up late therefore cannot move a
record its successor has adopted (adoption rewrites it with the new term): its write
fails with `RemovalConflict` and it abandons that removal. That is the fencing by term
on the records; the lease (lease.py) fences everything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.js.client import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tierflow.contracts import messages, subjects
from tierflow.contracts.autoscaler import Removal, removal_decoder
from tierflow.runtime.kv import open_bucket, snapshot

__all__ = ["RemovalBook", "RemovalConflict", "KvRemovalBook", "MemoryRemovalBook", "open_autoscaler_bucket"]

_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream: the expected last revision did not match
BUCKET_HISTORY = 1  # only the latest lease and records matter


class RemovalConflict(Exception):
    """The record is not (or no longer) what this writer last saw: someone else owns it."""


class RemovalBook(Protocol):
    async def begin(self, record: Removal) -> int:
        """Record a new removal; its revision. `RemovalConflict` if one exists for the node."""
        ...

    async def advance(self, record: Removal, revision: int) -> int:
        """Replace the record at `revision` (a phase change); the new revision."""
        ...

    async def end(self, node_id: str, revision: int | None) -> None:
        """Delete the record (at `revision`; None: whatever it is, for a write whose
        outcome is unknown)."""
        ...

    async def pending(self) -> list[tuple[Removal, int]]:
        """Every record with its revision."""
        ...


async def open_autoscaler_bucket(js: JetStreamContext, *, replicas: int) -> KeyValue:
    """The autoscaler's bucket, made when missing: file storage, `replicas` copies on a
    cluster (one on a single server)."""
    return await open_bucket(js, subjects.AUTOSCALER_BUCKET, create=True, history=BUCKET_HISTORY, replicas=replicas)


class KvRemovalBook:
    """Records in the bucket `bucket()` opens (made on first use)."""

    def __init__(self, js: JetStreamContext, bucket: Callable[[], Awaitable[KeyValue]]) -> None:
        self._js = js
        self._bucket = bucket

    async def begin(self, record: Removal) -> int:
        kv = await self._bucket()
        try:
            return await kv.create(subjects.removal_key(record.node_id), messages.encoder.encode(record))
        except KeyWrongLastSequenceError:
            raise RemovalConflict(f"node {record.node_id} is already being removed") from None

    async def advance(self, record: Removal, revision: int) -> int:
        kv = await self._bucket()
        try:
            return await kv.update(subjects.removal_key(record.node_id), messages.encoder.encode(record), last=revision)
        except KeyWrongLastSequenceError:
            raise RemovalConflict(f"the removal of {record.node_id} changed hands (revision {revision} is not the latest)") from None

    async def end(self, node_id: str, revision: int | None) -> None:
        kv = await self._bucket()
        try:
            await kv.delete(subjects.removal_key(node_id), last=revision)
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise RemovalConflict(f"the removal of {node_id} changed hands (revision {revision} is not the latest)") from None
            raise

    async def pending(self) -> list[tuple[Removal, int]]:
        return [(removal_decoder.decode(e.value), e.revision or 0) for e in await snapshot(self._js, subjects.AUTOSCALER_BUCKET, subjects.REMOVAL_KEYS) if e.value]


class MemoryRemovalBook:
    """The same compare-and-set rules over a dict (revisions count up from 1)."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[Removal, int]] = {}
        self._revision = 0

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    async def begin(self, record: Removal) -> int:
        if record.node_id in self.records:
            raise RemovalConflict(f"node {record.node_id} is already being removed")
        revision = self._next()
        self.records[record.node_id] = (record, revision)
        return revision

    async def advance(self, record: Removal, revision: int) -> int:
        held = self.records.get(record.node_id)
        if held is None or held[1] != revision:
            raise RemovalConflict(f"the removal of {record.node_id} changed hands (revision {revision} is not the latest)")
        new = self._next()
        self.records[record.node_id] = (record, new)
        return new

    async def end(self, node_id: str, revision: int | None) -> None:
        held = self.records.get(node_id)
        if held is not None and revision is not None and held[1] != revision:
            raise RemovalConflict(f"the removal of {node_id} changed hands (revision {revision} is not the latest)")
        self.records.pop(node_id, None)

    async def pending(self) -> list[tuple[Removal, int]]:
        return [(record, revision) for record, revision in self.records.values()]
