"""JetStream KV helpers: open-or-create a bucket, read it whole, follow it as a live cache,
and write several keys atomically.

- `open_bucket`: the bucket; with `create=True` it is made when missing and its stream
  kept as the owner wants it (replicas across a cluster, atomic batch writes allowed),
  also for a bucket made by an older version.
- `snapshot`: every key's latest entry, read so that it cannot straddle a write.
- `follow` (`kv_watch`): the read side every watcher needs, through NATS outages.
- `commit_batch` (`kv_batch`): many writes stored whole or not at all.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace

from nats.js.api import KeyValueConfig, RawStreamMsg, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ServerError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from tierflow.runtime.kv_batch import (
    BATCH_HEADER,
    MAX_BATCH,
    BatchConflict,
    BatchError,
    BatchRejected,
    BatchTooLarge,
    KVWrite,
    commit_batch,
    parse_batch_header,
)
from tierflow.runtime.kv_watch import OnDelete, OnPut, follow

__all__ = [
    "open_bucket",
    "allow_atomic",
    "follow",
    "snapshot",
    "SnapshotUnstable",
    "OnPut",
    "OnDelete",
    "KVWrite",
    "commit_batch",
    "MAX_BATCH",
    "BatchError",
    "BatchConflict",
    "BatchTooLarge",
    "BatchRejected",
]

log = logging.getLogger(__name__)
_REPLICAS_NEED_CLUSTER = 10074  # JetStream: "replicas > 1 not supported in non-clustered mode"
_PARALLEL_READS = 32  # requests in flight while reading a bucket whole
_CUT_BATCH_AFTER = 1.0  # seconds a stream may end inside a batch before it counts as cut


async def open_bucket(
    js: JetStreamContext, bucket: str, *, create: bool = False, history: int = 10, replicas: int = 1, atomic: bool = False
) -> KeyValue:
    """The bucket; with create=True it is made (file storage) when missing.

    With create=True the caller owns the bucket, so an existing one is brought to what it
    asks: `atomic` turns on atomic batch writes (`allow_atomic`, nats-server >= 2.12;
    raises RuntimeError on an older server, which would store a batch's messages one by
    one), and a bucket with fewer than `replicas` copies gets more when the server is
    clustered (a warning when the server refuses).
    """
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        if not create:
            raise
        config = KeyValueConfig(bucket=bucket, history=history, storage=StorageType.FILE, replicas=replicas)
        try:
            kv = await js.create_key_value(config)
        except ServerError as exc:
            if replicas <= 1 or exc.err_code != _REPLICAS_NEED_CLUSTER:
                raise
            # A single server (a laptop, a test) cannot keep copies: say so, keep one.
            log.info("NATS is not clustered: bucket %s gets 1 replica instead of %d", bucket, replicas)
            kv = await js.create_key_value(replace(config, replicas=1))
    if create:
        await _reconcile(js, bucket, replicas=replicas, atomic=atomic)
    return kv


async def allow_atomic(js: JetStreamContext, bucket: str) -> None:
    """Let the bucket's stream take atomic batches (idempotent)."""
    await _reconcile(js, bucket, replicas=0, atomic=True)


async def _reconcile(js: JetStreamContext, bucket: str, *, replicas: int, atomic: bool) -> None:
    config = (await js.stream_info(f"KV_{bucket}")).config
    fields = {"bucket": bucket}
    if atomic and not config.allow_atomic:
        config = (await js.update_stream(replace(config, allow_atomic=True))).config
        if not config.allow_atomic:  # an older server drops fields it does not know
            version = js._nc._server_info.get("version", "?")
            raise RuntimeError(f"nats-server {version} cannot store atomic batches (bucket {bucket}); tierflow needs nats-server >= 2.12")
        log.info("bucket %s now takes atomic batch writes", bucket, extra={"fields": fields})
    have = config.num_replicas or 1
    if replicas > have:
        try:
            await js.update_stream(replace(config, num_replicas=replicas))
        except ServerError as exc:
            if exc.err_code == _REPLICAS_NEED_CLUSTER:
                return  # a single server: one copy is all there can be
            log.warning(
                "bucket %s keeps %d replica(s): NATS refused %d (%s); losing the server that holds it loses the bucket",
                bucket, have, replicas, exc.description or exc, extra={"fields": {**fields, "replicas": have, "wanted": replicas}},
            )  # fmt: skip
            return
        log.info("bucket %s now has %d replicas (had %d)", bucket, replicas, have, extra={"fields": {**fields, "replicas": replicas}})


async def _last_msg(js: JetStreamContext, stream: str, subject: str, gate: asyncio.Semaphore) -> RawStreamMsg | None:
    async with gate:
        try:
            return await js.get_msg(stream, subject=subject)
        except NotFoundError:
            return None


async def _inside_batch(js: JetStreamContext, stream: str, seq: int) -> bool:
    """Is the message at `seq` one of an atomic batch that is not all appended yet? (The
    server appends a committed batch message by message: a reader can land between.)"""
    if seq == 0:
        return False
    try:
        msg = await js.get_msg(stream, seq=seq)
    except NotFoundError:  # purged: not a batch being appended
        return False
    marker = parse_batch_header((msg.headers or {}).get(BATCH_HEADER))
    return marker is not None and marker[1] < marker[2]


class SnapshotUnstable(RuntimeError):
    """The bucket changed during every attempt to read it whole."""


async def snapshot(
    js: JetStreamContext, bucket: str, keys: str = ">", *, deleted: bool = False, attempts: int = 20
) -> list[KeyValue.Entry]:
    """The latest entry of every key matching `keys` (a subject pattern), as of one moment.

    The key list comes from the server (the KV stream's per-subject state), then each key
    is read from the stream leader. The stream's last sequence is checked before and
    after, and the message there must not be inside an atomic batch (the server appends a
    committed batch message by message): otherwise a write came in between (half of a
    batch read before it, half after), and the whole read starts again. With `deleted`,
    keys whose latest message is a delete or purge marker are included (their `operation`
    says so, their `revision` is the marker's: what a compare-and-set re-creating the key
    must name).
    Costs one request per key (sent together): for registry-sized buckets, written rarely.
    """
    stream = f"KV_{bucket}"
    prefix = len(f"$KV.{bucket}.")
    gate = asyncio.Semaphore(_PARALLEL_READS)
    stuck, stuck_since = -1, 0.0  # a last sequence found inside a batch, and since when
    clock = asyncio.get_running_loop().time
    for attempt in range(attempts):
        try:
            info = await js.stream_info(stream, subjects_filter=f"$KV.{bucket}.{keys}")
        except NotFoundError:
            return []
        last = info.state.last_seq
        subjects = sorted(info.state.subjects or {})
        messages = await asyncio.gather(*(_last_msg(js, stream, s, gate) for s in subjects))  # in parallel: a short window
        moved = any(m is None or (m.seq or 0) > last for m in messages)  # None: purged since the listing
        entries: list[KeyValue.Entry] = []
        for subject, msg in zip(subjects, messages, strict=True):
            if msg is None:
                continue
            operation = (msg.headers or {}).get(KV_OP)
            if operation in (KV_DEL, KV_PURGE) and not deleted:
                continue
            entries.append(KeyValue.Entry(bucket=bucket, key=subject[prefix:], value=msg.data, revision=msg.seq, delta=None, created=None, operation=operation))
        if not moved:
            try:
                inside = await _inside_batch(js, stream, last)
                if not inside:
                    stuck = -1
                elif last != stuck:
                    stuck, stuck_since = last, clock()
                elif clock() - stuck_since >= _CUT_BATCH_AFTER:
                    # A batch being appended would have moved on long ago: the stream holds
                    # a cut one (a server crash mid-append?). Read it as it is.
                    log.warning("bucket %s ends inside an atomic batch at sequence %d; reading it as it is", bucket, last)
                    inside = False
                if not inside and (await js.stream_info(stream)).state.last_seq == last:
                    return entries
            except NotFoundError:
                return []
        await asyncio.sleep(0.1 if stuck >= 0 else random.uniform(0, min(0.05, 0.002 * 2**attempt)))
    raise SnapshotUnstable(f"bucket {bucket} changed during each of {attempts} attempts to read it whole; try again")
