"""Several KV writes stored whole or not at all: JetStream atomic batch publish (ADR-50).

Why: a fleet apply changes many keys at once, and a writer that dies halfway must not
leave half of them written. nats-server >= 2.12 stores a batch of messages atomically
when the stream allows it (`allow_atomic`, see `kv.open_bucket(atomic=True)`): messages
1..n carry `Nats-Batch-Id` and `Nats-Batch-Sequence`, the last one `Nats-Batch-Commit`;
the server keeps them aside until the commit and then appends all of them, consecutively,
or (a compare-and-set fails, a message is missing, the commit never comes) none. A batch
whose commit never arrives is dropped by the server after its batch timeout (10 s).

Each write is a message on the KV stream's subject for its key, with the KV protocol's
own headers: `Nats-Expected-Last-Subject-Sequence` for compare-and-set (0: the key has no
message at all) and `KV-Operation: DEL` for a delete. One failed expectation rejects the
whole batch (`BatchConflict`): the caller re-reads and retries.

Readers must also *apply* a batch whole; the server's headers say which batch a message
belongs to but readers should not depend on what the server chooses to keep, so every
message also carries ours, `Tierflow-Batch: <id> <i>/<n>`. `kv_watch.follow` buffers the
messages of one batch and hands them to its callbacks together.

Limits: the server refuses batches over `jetstream.limits.batch.max_msgs` (default 1,000;
`BatchTooLarge`, checked here before anything is sent) and holds at most 50 unfinished
batches per stream.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from nats.js.api import Header
from nats.js.client import JetStreamContext
from nats.js.kv import KV_DEL, KV_OP

from tierflow.contracts import subjects

__all__ = [
    "BATCH_HEADER",
    "MAX_BATCH",
    "KVWrite",
    "BatchError",
    "BatchConflict",
    "BatchTooLarge",
    "BatchRejected",
    "commit_batch",
    "parse_batch_header",
]

BATCH_HEADER = subjects.KV_BATCH_HEADER
MAX_BATCH = 1000  # nats-server's default jetstream.limits.batch.max_msgs

_WRONG_LAST_SEQUENCE = (10071, 10164)
_TOO_LARGE = 10199
_ATOMIC_DISABLED = 10174


@dataclass(frozen=True, slots=True)
class KVWrite:
    """Put `value` at `key` (None: delete it) if the key is at revision `expected`.

    `expected` is the stream sequence of the key's latest message, delete markers
    included; 0 means the key has no message at all; None writes unconditionally.
    """

    key: str
    value: bytes | None
    expected: int | None = None


class BatchError(Exception):
    """A batch was not stored; nothing of it was written."""


class BatchConflict(BatchError):
    """A key was not at its expected revision (someone else wrote it)."""


class BatchTooLarge(BatchError, ValueError):
    """More writes than the server takes in one atomic batch."""


class BatchRejected(BatchError):
    """The server refused the batch for another reason; `code` is its JetStream error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    @property
    def atomic_disabled(self) -> bool:
        return self.code == _ATOMIC_DISABLED


def parse_batch_header(value: str | None) -> tuple[str, int, int] | None:
    """(batch id, position, size) of a `Tierflow-Batch` header; None when absent or malformed."""
    if not value:
        return None
    batch_id, _, where = value.strip().partition(" ")
    position, _, size = where.partition("/")
    if not batch_id or not position.isdigit() or not size.isdigit():
        return None
    return batch_id, int(position), int(size)


async def commit_batch(
    js: JetStreamContext, bucket: str, writes: Sequence[KVWrite], *, timeout: float = 5.0, max_size: int = MAX_BATCH
) -> list[int]:
    """Store `writes` in `bucket` atomically; the new revision of each, in order.

    Raises BatchConflict, BatchTooLarge, BatchRejected (nothing stored), or the NATS
    client's own errors (a timeout on the commit means the outcome is unknown: read again).
    """
    if not writes:
        return []
    if len(writes) > max_size:
        raise BatchTooLarge(f"{len(writes)} writes in one atomic batch; the NATS server takes at most {max_size}")
    keys = [w.key for w in writes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a batch writes each key once; repeated: {sorted({k for k in keys if keys.count(k) > 1})}")
    nc = js._nc
    batch_id = uuid.uuid4().hex
    size = len(writes)
    reply = None
    for position, write in enumerate(writes, 1):
        headers = {
            Header.BATCH_ID.value: batch_id,
            Header.BATCH_SEQUENCE.value: str(position),
            BATCH_HEADER: f"{batch_id} {position}/{size}",
        }
        if write.expected is not None:
            headers[Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value] = str(write.expected)
        if write.value is None:
            headers[KV_OP] = KV_DEL
        subject = f"$KV.{bucket}.{write.key}"
        if position < size:
            await nc.publish(subject, write.value or b"", headers=headers)
        else:
            headers[Header.BATCH_COMMIT.value] = "1"
            reply = await nc.request(subject, write.value or b"", headers=headers, timeout=timeout)
    assert reply is not None
    ack = json.loads(reply.data or b"{}")
    error = ack.get("error")
    if error:
        code, description = int(error.get("err_code", 0)), str(error.get("description", error))
        if code in _WRONG_LAST_SEQUENCE:
            raise BatchConflict(description)
        if code == _TOO_LARGE:
            raise BatchTooLarge(f"the NATS server refused a batch of {size} writes: {description}")
        raise BatchRejected(f"the NATS server refused the batch: {description}", code)
    last = int(ack["seq"])
    # The server appends a committed batch consecutively: the commit's sequence is the last.
    return list(range(last - size + 1, last + 1))
