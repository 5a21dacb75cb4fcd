"""The registry's durable state: records in a JetStream KV bucket (file storage).

The KV adapter and nothing else:

- `read`: the bucket as a `Snapshot`, as of one moment (`runtime.kv.snapshot` reads again
  when a write lands during the read, so a read never straddles an apply);
- `write`: one record with compare-and-set on the revision it was read at (the admin
  API's single-model operations);
- `write_all`: the records of one apply as one atomic batch (`runtime.kv.commit_batch`):
  the server stores all of them or none, and readers following the bucket apply them
  together, so nobody ever sees a fleet half applied, even if this process dies midway.

A lost race is a `Conflict`; the caller (service.RegistryService) re-reads and retries,
or reports it, never overwrites. NATS failures become `errors.Unavailable` with what to
do about them, and a batch too large for the server `errors.FailedPrecondition`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tierflow.runtime.kv import (
    MAX_BATCH,
    BatchConflict,
    BatchRejected,
    BatchTooLarge,
    KVWrite,
    SnapshotUnstable,
    allow_atomic,
    commit_batch,
    snapshot,
)
from tierflow.services.model_registry.errors import Aborted, FailedPrecondition, RegistryError, Unavailable
from tierflow.services.model_registry.state import Kind, Record, Snapshot, State, decode_record, key_of, parse_key

__all__ = ["RegistryStore", "Conflict", "Write"]

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes

# One record of an apply: (kind, name, record or None to delete, revision it must be at)
Write = tuple[Kind, str, Record | None, int]


class Conflict(Exception):
    """Someone else changed the key since it was read."""


class RegistryStore:
    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, *, max_batch: int = MAX_BATCH, commit_timeout: float = 5.0) -> None:
        self._js = js
        self._kv = kv
        self._bucket = bucket
        self._max_batch = max_batch
        self._commit_timeout = commit_timeout

    async def read(self) -> Snapshot:
        """Every record and every key's revision, exact as of one moment.

        Keys are listed by the server and read one by one (`runtime.kv.snapshot`); a write
        landing meanwhile makes it read again."""
        self._require_connection("read the registry")
        try:
            entries = await snapshot(self._js, self._bucket, deleted=True)
        except SnapshotUnstable as exc:
            raise Aborted(f"the registry kept changing while it was read ({exc})") from exc
        except Exception as exc:
            raise self._failure(exc, "read the registry") from exc
        state, revisions, deleted = State(), {}, {}
        for entry in entries:
            if entry.operation in (KV_DEL, KV_PURGE):
                deleted[entry.key] = entry.revision or 0
                continue
            parsed = parse_key(entry.key)
            if parsed is None or entry.value is None:
                continue
            kind, name = parsed
            revisions[entry.key] = entry.revision or 0
            try:
                state.of(kind)[name] = decode_record(kind, entry.value)
            except msgspec.DecodeError as exc:  # kept in revisions: the next write replaces it
                log.warning("registry record %s is unreadable (%s); an apply will overwrite it", entry.key, exc)
        return Snapshot(state=state, revisions=revisions, deleted=deleted)

    async def get(self, kind: Kind, name: str) -> tuple[Record | None, int]:
        """The record and its revision; (None, 0) when absent."""
        self._require_connection(f"read {kind} {name!r}")
        try:
            entry = await self._kv.get(key_of(kind, name))
        except KeyNotFoundError:
            return None, 0
        except Exception as exc:
            raise self._failure(exc, f"read {kind} {name!r}") from exc
        if entry.value is None:
            return None, 0
        return decode_record(kind, entry.value), entry.revision or 0

    async def write(self, kind: Kind, name: str, record: Record | None, *, revision: int) -> int:
        """Put `record` (None: delete) if the key is still at `revision` (0: absent).

        Returns the key's new revision (0 after a delete); raises Conflict otherwise.
        """
        key = key_of(kind, name)
        self._require_connection(f"write {kind} {name!r}")
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
            raise self._failure(exc, f"write {kind} {name!r}") from exc
        except Exception as exc:
            raise self._failure(exc, f"write {kind} {name!r}") from exc

    async def write_all(self, writes: Sequence[Write]) -> list[int]:
        """Store every write or none (one atomic batch); the new revision of each, in order
        (0 for a delete). Each must find its key at the revision it names (0: no message
        at all; a deleted key's marker revision, `Snapshot.expected`), else Conflict.
        """
        if not writes:
            return []
        if len(writes) > self._max_batch:
            raise FailedPrecondition(
                f"this apply changes {len(writes)} records; the registry writes an apply as one atomic batch and the NATS server"
                f" stores at most {self._max_batch} messages in one (jetstream.limits.batch.max_msgs): split the fleet file"
                " into smaller applies, or raise the server's limit"
            )
        batch = [KVWrite(key_of(kind, name), None if record is None else _encode(record), expected) for kind, name, record, expected in writes]
        doing = f"write {len(batch)} registry records"
        self._require_connection(doing)
        for attempt in (1, 2):
            try:
                revisions = await commit_batch(self._js, self._bucket, batch, timeout=self._commit_timeout, max_size=self._max_batch)
            except BatchConflict as exc:
                raise Conflict(f"a record changed since it was read ({exc})") from exc
            except BatchTooLarge as exc:
                raise FailedPrecondition(f"{exc}: split the fleet file into smaller applies, or raise the server's jetstream.limits.batch.max_msgs") from exc
            except BatchRejected as exc:
                if exc.atomic_disabled and attempt == 1:  # a bucket recreated by someone else
                    log.warning("bucket %s did not take atomic writes; enabling them", self._bucket)
                    try:
                        await allow_atomic(self._js, self._bucket)
                    except Exception as fix:
                        raise self._failure(fix, doing) from fix
                    continue
                raise Unavailable(f"cannot {doing}: {exc}; nothing was written, retry") from exc
            except nats.errors.TimeoutError as exc:
                raise Unavailable(
                    f"cannot {doing}: the NATS server did not confirm the write within {self._commit_timeout:g}s, so it may or may"
                    " not be stored (whole or not at all); list the registry or apply again (an apply is idempotent)"
                ) from exc
            except Exception as exc:
                raise self._failure(exc, doing) from exc
            return [0 if record is None else revision for (_, _, record, _), revision in zip(writes, revisions, strict=True)]
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ NATS failures

    def _require_connection(self, doing: str) -> None:
        """Fail at once while the client is reconnecting (a request would wait its whole timeout)."""
        nc = self._js._nc
        if not nc.is_connected:
            state = "closed" if nc.is_closed else "disconnected (it reconnects on its own)"
            raise Unavailable(f"cannot {doing}: NATS is {state}; retry in a few seconds")

    def _failure(self, exc: BaseException, doing: str) -> BaseException:
        """The registry error a NATS failure means, or `exc` itself when it is not one."""
        if isinstance(exc, RegistryError):
            return exc
        if isinstance(exc, nats.js.errors.NotFoundError):
            return Unavailable(f"cannot {doing}: bucket {self._bucket} is missing on NATS (JetStream lost it?); restart the registry to create it again")
        if isinstance(exc, APIError) and exc.code != 503:
            return exc  # a refusal that is not an outage: a bug to see, not to retry
        if isinstance(exc, (nats.errors.Error, TimeoutError, OSError)):
            what = str(exc) or type(exc).__name__
            return Unavailable(f"cannot {doing}: NATS/JetStream did not answer ({what}); retry in a few seconds")
        return exc
