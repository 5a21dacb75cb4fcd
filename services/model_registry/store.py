"""The registry's durable state: records in a JetStream KV bucket (file storage).

The KV adapter and nothing else: read the bucket into a `Snapshot`, write one record
with compare-and-set on the revision it was read at. A lost race is a `Conflict`; the
caller (service.RegistryService) re-reads and retries, or reports it, never overwrites.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.client import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tierflow.runtime.kv import snapshot
from tierflow.services.model_registry.state import Kind, Record, Snapshot, State, decode_record, key_of, parse_key

__all__ = ["RegistryStore", "Conflict"]

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes


class Conflict(Exception):
    """Someone else changed the key since it was read."""


class RegistryStore:
    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str) -> None:
        self._js = js
        self._kv = kv
        self._bucket = bucket

    async def read(self) -> Snapshot:
        """Every record and every key's revision, exact as of the call.

        `runtime.kv.snapshot` lists the keys from the server and reads each: a watch's
        end-of-snapshot marker can come before entries nats-py already holds, and with
        writers racing, a record read that way could be missing (its key then looks
        unregistered)."""
        state, revisions = State(), {}
        for entry in await snapshot(self._js, self._bucket):
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
