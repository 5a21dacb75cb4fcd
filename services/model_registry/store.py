"""The registry's durable state: records in a JetStream KV bucket (file storage).

The KV adapter and nothing else: read the bucket into a `Snapshot`, write one record
with compare-and-set on the revision it was read at. A lost race is a `Conflict`; the
caller (service.RegistryService) re-reads and retries, or reports it, never overwrites.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tierflow.services.model_registry.state import Kind, Record, Snapshot, State, decode_record, key_of, parse_key

__all__ = ["RegistryStore", "Conflict"]

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes


class Conflict(Exception):
    """Someone else changed the key since it was read."""


class RegistryStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def _latest(self) -> list[KeyValue.Entry]:
        """The latest entry of every key (deletes included), complete up to the moment of the call.

        A watch over the bucket, read until it reaches the stream's last sequence as of
        before the watch began, or until the server says nothing more is pending. (nats-py
        puts its end-of-snapshot `None` before entries the server already sent when they
        are still queued client-side, so `runtime.kv.snapshot` can miss keys: harmless for
        a status display, not for a store that decides what to create and what to list.)
        """
        stream = (await self._kv.status()).stream_info.state
        last = stream.last_seq or 0
        if last == 0 or not stream.messages:
            return []
        latest: dict[str, KeyValue.Entry] = {}
        watcher = await self._kv.watch(">")
        try:
            while True:
                entry = await watcher.updates(timeout=5.0)
                if entry is None:
                    continue  # the client's marker; the sequence below is what counts
                latest[entry.key] = entry
                if (entry.revision or 0) >= last or entry.delta == 0:  # delta: messages still pending
                    return list(latest.values())
        finally:
            await watcher.stop()

    async def read(self) -> Snapshot:
        """Every record and every key's revision, in one pass over the bucket."""
        state, revisions = State(), {}
        for entry in await self._latest():
            parsed = parse_key(entry.key)
            if parsed is None or entry.value is None or entry.operation in (KV_DEL, KV_PURGE):
                continue
            kind, name = parsed
            revisions[entry.key] = entry.revision or 0
            try:
                state.of(kind)[name] = decode_record(kind, entry.value)
            except msgspec.DecodeError as exc:  # kept in revisions: the next write replaces it
                log.warning("registry record %s is unreadable (%s); an apply will overwrite it", entry.key, exc)
        return Snapshot(state=state, revisions=revisions)

    async def get(self, kind: Kind, name: str) -> tuple[Record | None, int]:
        """The record and its revision; (None, 0) when absent."""
        try:
            entry = await self._kv.get(key_of(kind, name))
        except KeyNotFoundError:
            return None, 0
        if entry.value is None:
            return None, 0
        return decode_record(kind, entry.value), entry.revision or 0

    async def write(self, kind: Kind, name: str, record: Record | None, *, revision: int) -> int:
        """Put `record` (None: delete) if the key is still at `revision` (0: absent).

        Returns the key's new revision (0 after a delete); raises Conflict otherwise.
        """
        key = key_of(kind, name)
        try:
            if record is None:
                if revision:
                    await self._kv.delete(key, last=revision)
                return 0
            if revision == 0:
                return await self._kv.create(key, _encode(record))
            return await self._kv.update(key, _encode(record), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise Conflict(f"{kind} {name!r} changed since it was read (revision {revision})") from exc
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise Conflict(f"{kind} {name!r} changed since it was read (revision {revision})") from exc
            raise
