"""`follow`: mirror keys of a JetStream KV bucket into a caller's callbacks, through outages.

What every watcher in the fabric needs (router, nodes, autoscaler): the latest value of
every key, a signal once that snapshot is in, then each change as it happens, deletes
included, for as long as the service lives, whatever NATS does meanwhile.

Why not nats-py's `KeyValue.watch`: its ordered consumer recovers from a lost consumer
only when two idle heartbeats (5 s each) have gone missing, and it retries the
re-creation once, silently; after a NATS restart a watch came back only after ~18 s.
It also resumes by stream sequence, which is wrong once the bucket has been recreated,
and it hides the message headers that say which writes belong to one atomic batch.

So the watch is our own ephemeral ordered push consumer (the same consumer settings:
last value per subject, no acks, flow control, idle heartbeats, in memory), read on a
plain subscription, and started again from a fresh snapshot whenever:

- the client reconnected (`nc.stats["reconnects"]` moved; noticed within 0.25 s),
- a message is missing (consumer sequence gap, or a heartbeat naming a later one),
- nothing, not even a heartbeat, arrived for `stall_after` heartbeats (the consumer or
  its server is gone: a cluster member died, the bucket was deleted),
- anything unexpected was raised (logged with its traceback).

Starting fails while JetStream cannot answer (server restarting, a cluster electing a
leader, bucket not created yet); it is retried with a backoff (`retry_delay` doubling to
`max_retry_delay`), and the outage is logged once when it begins and once when it ends.

When the snapshot is whole: the stream's last sequence is read just after the consumer
is made; once the consumer has passed it (a message at or after it, or a heartbeat
saying so), outside a batch, every key's value as of that moment has arrived.
(Messages' `num_pending` cannot say it: the server counts it while a batch is still
being appended, so it reads 0 halfway through one.)

Converging after a restart: the new snapshot is applied as a whole against what the
caller was told before: every live key is put again (callbacks must be idempotent),
delete markers are deletes, and a key the caller holds that the snapshot lacks entirely
(the bucket was recreated without it) is deleted too. `on_snapshot` runs once, after the
first snapshot: callers treat it as "synced".

Applying a batch whole: messages written by `kv_batch.commit_batch` carry
`Tierflow-Batch: <id> <i>/<n>`; the server appends a committed batch consecutively, so
its messages are buffered until the one at position n and then applied together. To be
sure to see that last message, the consumer takes every key of the bucket and `keys` is
matched here (a filtered consumer could hide it). Should the stream ever hold a batch
cut short (a server dying mid-append), the consumer goes idle inside it; the idle
heartbeat then applies what is stored, with a warning, rather than waiting forever.
The callbacks of one group (a snapshot, a batch, a single write) run with no await
between them when they are plain functions, so no other task of the caller ever sees a
group half applied; `on_applied` runs after each group.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header
from nats.js.client import JetStreamContext
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from tierflow.runtime.kv_batch import BATCH_HEADER, parse_batch_header
from tierflow.runtime.service import server_round_trip
from tierflow.runtime.supervise import Backoff
from tierflow.runtime.waiting import first

__all__ = ["follow", "OnPut", "OnDelete"]

log = logging.getLogger(__name__)

OnPut = Callable[[str, bytes, int], Awaitable[None] | None]
OnDelete = Callable[[str], Awaitable[None] | None]

_POLL = 0.25  # how often a quiet watch checks for a reconnect or a stall
_API_TIMEOUT = 1.0  # per JetStream API call: an attempt sent into an outage must not hold the next one back long
_MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+ TTL / purge markers
_MARKER_OPS = {"MaxAge": KV_PURGE, "Purge": KV_PURGE, "Remove": KV_DEL}


class _Progress:
    """Where one consumer is: its snapshot until complete, then the live batch being read.

    `ops` holds what is not applied yet: the whole snapshot (by key, stream order), then
    the messages of a batch whose last message has not come."""

    __slots__ = ("snapshot_until", "snapshotting", "delivered", "open_batch", "ops")

    def __init__(self, *, snapshot_until: int) -> None:
        self.snapshot_until = snapshot_until
        self.snapshotting = True
        self.delivered = 0  # consumer sequence of the last data message
        self.open_batch: str | None = None  # a batch read up to, not including, its last message
        self.ops: dict[str, _Op] = {}

    def add(self, op: _Op) -> None:
        self.ops.pop(op.key, None)  # keep stream order: the latest last
        self.ops[op.key] = op

    def take(self) -> dict[str, _Op]:
        ops, self.ops = self.ops, {}
        self.snapshotting = False
        return ops


class _Restart(Exception):
    """The watch must start again from a fresh snapshot (not an error)."""


@dataclass(slots=True)
class _Op:
    key: str
    value: bytes | None  # None: deleted
    revision: int


async def follow(
    js: JetStreamContext,
    bucket: str,
    keys: str,
    *,
    on_put: OnPut,
    on_delete: OnDelete,
    on_snapshot: Callable[[], None] | None = None,
    stopping: asyncio.Event,
    retry_delay: float = 0.1,
    max_retry_delay: float = 1.0,
    nc: NATS | None = None,
    on_applied: Callable[[], None] | None = None,
    idle_heartbeat: float = 1.0,
    stall_after: float = 2.5,
) -> None:
    """Mirror `keys` (a subject pattern) of `bucket` into the callbacks until `stopping` is set.

    `nc` is the client `js` belongs to (by default `js._nc`). A callback that raises is
    logged and the watch goes on. Never returns before `stopping` is set.
    """
    follower = _Follower(
        js, nc or js._nc, bucket, keys, on_put=on_put, on_delete=on_delete, on_snapshot=on_snapshot, on_applied=on_applied,
        stopping=stopping, backoff=Backoff(retry_delay, max(retry_delay, max_retry_delay)), idle_heartbeat=idle_heartbeat,
        stall_after=stall_after,
    )  # fmt: skip
    await follower.run()


class _Follower:
    def __init__(
        self,
        js: JetStreamContext,
        nc: NATS,
        bucket: str,
        keys: str,
        *,
        on_put: OnPut,
        on_delete: OnDelete,
        on_snapshot: Callable[[], None] | None,
        on_applied: Callable[[], None] | None,
        stopping: asyncio.Event,
        backoff: Backoff,
        idle_heartbeat: float,
        stall_after: float,
    ) -> None:
        self._js = js
        self._nc = nc
        self._bucket = bucket
        self._keys = keys
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._on_put = on_put
        self._on_delete = on_delete
        self._on_snapshot = on_snapshot
        self._on_applied = on_applied
        self._stopping = stopping
        self._backoff = backoff
        self._heartbeat = idle_heartbeat
        self._stall = stall_after * idle_heartbeat
        self._told: set[str] = set()  # keys the caller holds (was last told put)
        self._synced = False
        self._converged = False  # the current watch has applied its snapshot
        self._outage_since: float | None = None
        self._attempt_began = 0.0
        self._failures = 0
        self._clock = asyncio.get_running_loop().time
        self._what = f"{bucket}/{keys}"
        self._pattern = keys.split(".")

    # ------------------------------------------------------------------ the outer loop

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._attempt_began = self._clock()
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except _Restart as why:
                log.info("watch of %s restarts: %s", self._what, why, extra={"fields": {"bucket": self._bucket, "keys": self._keys, "reason": str(why)}})
                if not self._converged:  # restarting before even a snapshot: do not spin
                    await first(self._stopping.wait(), timeout=self._backoff.next())
                continue
            except Exception as exc:
                if self._stopping.is_set():
                    return
                delay = self._backoff.next()
                self._failed(exc, delay)
                await first(self._stopping.wait(), timeout=delay)

    def _failed(self, exc: Exception, delay: float) -> None:
        """Log an outage once when it begins; later attempts only at debug level."""
        self._failures += 1
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._outage_since is None:
            self._outage_since = self._attempt_began
            expected = isinstance(exc, (nats.errors.Error, asyncio.TimeoutError, OSError))
            log.log(
                logging.WARNING if expected else logging.ERROR,
                "watch of %s is down (%s); retrying until JetStream answers",
                self._what, reason, exc_info=not expected,
                extra={"fields": {"bucket": self._bucket, "keys": self._keys, "error": reason}},
            )  # fmt: skip
        else:
            log.debug("watch of %s still down (%s); next try in %.2fs", self._what, reason, delay)

    def _resumed(self) -> None:
        self._backoff.reset()
        if self._outage_since is not None:
            down = self._clock() - self._outage_since
            log.info("watch of %s resumed after %.1fs (%d failed attempts)", self._what, down, self._failures,
                     extra={"fields": {"bucket": self._bucket, "keys": self._keys, "down_s": round(down, 3), "attempts": self._failures}})  # fmt: skip
        self._outage_since = None
        self._failures = 0

    # ------------------------------------------------------------------ one watch

    async def _connected(self) -> None:
        while not self._nc.is_connected and not self._stopping.is_set():
            if self._nc.is_closed:
                raise nats.errors.ConnectionClosedError
            await first(self._stopping.wait(), timeout=0.05)

    async def _watch(self) -> None:
        """One consumer, from its snapshot until something says start again."""
        await self._connected()
        if self._stopping.is_set():
            return
        reconnects = self._nc.stats["reconnects"]
        self._converged = False
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)  # before the consumer exists: nothing is missed
        consumer = ""
        try:
            config = ConsumerConfig(
                deliver_subject=inbox, filter_subject=self._prefix + ">", deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE, max_deliver=1, flow_control=True, idle_heartbeat=self._heartbeat,
                mem_storage=True, num_replicas=1, inactive_threshold=max(10.0, 4 * self._stall),
            )  # fmt: skip
            consumer = (await self._js.add_consumer(self._stream, config=config, timeout=_API_TIMEOUT)).name
            # The snapshot is whole once the consumer has passed what the stream held just
            # after the consumer was made (and is not inside a batch).
            state = (await self._js.stream_info(self._stream)).state
            await self._consume(sub, reconnects, _Progress(snapshot_until=state.last_seq if state.messages else 0))
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
            if consumer and self._nc.is_connected:
                try:  # or the server drops it after inactive_threshold
                    await asyncio.wait_for(self._js.delete_consumer(self._stream, consumer), 0.5)
                except Exception:
                    pass

    async def _consume(self, sub: Subscription, reconnects: int, progress: _Progress) -> None:
        if progress.snapshot_until == 0:
            await self._converge(progress.take())
        heard = self._clock()
        while not self._stopping.is_set():
            if self._nc.stats["reconnects"] != reconnects:
                raise _Restart("NATS reconnected")
            try:
                msg = await sub.next_msg(timeout=_POLL)
            except nats.errors.TimeoutError:
                if self._clock() - heard > self._stall:
                    if not await server_round_trip(self._nc):
                        # The server (or the link) is what went quiet, not the consumer: it
                        # lives on for inactive_threshold and resumes with the server. A new
                        # one would need the JetStream meta leader, which a cluster that was
                        # paused whole re-elects for seconds after it is back.
                        heard = self._clock() - self._stall / 2  # ask again in a while
                        continue
                    raise _Restart(f"nothing from the server for {self._clock() - heard:.1f}s (consumer lost)") from None
                continue
            heard = self._clock()
            headers = msg.headers or {}
            status = headers.get(Header.STATUS.value)
            if status:
                passed = await self._control(msg, status, headers, progress.delivered)
                if not passed:
                    continue
                # An idle heartbeat: the server has nothing more for this consumer now.
                if progress.open_batch is not None and (not progress.snapshotting or passed >= progress.snapshot_until):
                    # A batch being appended keeps the consumer busy: this one will not end.
                    log.warning("watch of %s: batch %s is incomplete in the stream; applying the part stored", self._what, progress.open_batch)
                    progress.open_batch = None
                    await self._flush(progress)
                if progress.snapshotting and passed >= progress.snapshot_until and progress.open_batch is None:
                    await self._converge(progress.take())
                continue
            meta = msg.metadata
            if meta.sequence.consumer != progress.delivered + 1:
                raise _Restart(f"message {progress.delivered + 1} missing (got {meta.sequence.consumer})")
            progress.delivered = meta.sequence.consumer
            marker = parse_batch_header(headers.get(BATCH_HEADER))
            if progress.open_batch is not None and (marker is None or marker[0] != progress.open_batch) and not progress.snapshotting:
                # Cannot happen with batches from kv_batch (stored whole and consecutively);
                # in a snapshot it is normal (the batch's later keys were written again since).
                log.warning("watch of %s: batch %s ended without its last message", self._what, progress.open_batch)
                await self._flush(progress)
            progress.open_batch = marker[0] if marker is not None and marker[1] < marker[2] else None
            op = self._op(msg, headers, meta.sequence.stream)
            if op is not None:
                progress.add(op)
            if progress.open_batch is not None:
                continue  # the rest of the batch follows: the server stores it consecutively
            if progress.snapshotting:
                if meta.sequence.stream >= progress.snapshot_until:
                    await self._converge(progress.take())
            else:
                await self._flush(progress)


    async def _flush(self, progress: _Progress) -> None:
        if progress.snapshotting:
            return  # a snapshot is applied whole, at its end
        ops = progress.take()
        if ops:
            await self._apply(list(ops.values()))

    async def _control(self, msg: Msg, status: str, headers: dict[str, str], delivered: int) -> int:
        """Flow control, heartbeats, and whatever else the server says on the consumer; the
        stream sequence a heartbeat says the consumer has passed (0 otherwise)."""
        if status != "100":
            raise _Restart(f"server status {status} {headers.get(Header.DESCRIPTION.value, '')}".strip())
        if msg.reply:  # flow control: everything before it has been read
            await self._nc.publish(msg.reply)
            return 0
        stalled = headers.get(Header.CONSUMER_STALLED.value)
        if stalled:
            await self._nc.publish(stalled)
        last = headers.get(Header.LAST_CONSUMER.value)
        if last and last.isdigit() and int(last) > delivered:
            raise _Restart(f"messages {delivered + 1}..{last} missing (heartbeat)")
        passed = headers.get(Header.LAST_STREAM.value, "")
        return int(passed) if passed.isdigit() else 0

    def _op(self, msg: Msg, headers: dict[str, str], revision: int) -> _Op | None:
        """The message as a put or a delete of a key the caller follows; None otherwise."""
        key = msg.subject[len(self._prefix):]
        if not self._wanted(key):
            return None
        operation = headers.get(KV_OP)
        if operation is None and _MARKER_REASON in headers:
            operation = _MARKER_OPS.get(headers[_MARKER_REASON])
            if operation is None:
                return None  # a marker of a kind this code does not know: not a value
        if operation in (KV_DEL, KV_PURGE):
            return _Op(key, None, revision)
        return _Op(key, msg.data, revision)

    def _wanted(self, key: str) -> bool:
        """Does `key` match the followed pattern (NATS wildcards: `*` one token, `>` the rest)?"""
        tokens = key.split(".")
        for i, want in enumerate(self._pattern):
            if want == ">":
                return len(tokens) > i
            if i >= len(tokens) or (want != "*" and want != tokens[i]):
                return False
        return len(tokens) == len(self._pattern)

    # ------------------------------------------------------------------ telling the caller

    async def _converge(self, snapshot: dict[str, _Op]) -> None:
        """Apply a whole snapshot: the caller ends up holding exactly its live keys."""
        live = {k for k, op in snapshot.items() if op.value is not None}
        gone = [k for k in self._told if k not in snapshot]  # absent entirely: bucket recreated
        for key in sorted(gone):
            await self._call(self._on_delete, key)
        await self._apply(list(snapshot.values()), announce=False)
        self._told = live
        self._converged = True
        self._resumed()
        if self._on_applied is not None:
            await self._call(self._on_applied)
        if not self._synced:
            self._synced = True
            if self._on_snapshot is not None:
                await self._call(self._on_snapshot)

    async def _apply(self, ops: list[_Op], *, announce: bool = True) -> None:
        for op in ops:
            if op.value is None:
                self._told.discard(op.key)
                await self._call(self._on_delete, op.key)
            else:
                self._told.add(op.key)
                await self._call(self._on_put, op.key, op.value, op.revision)
        if announce and self._on_applied is not None:
            await self._call(self._on_applied)

    async def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Call one callback; await it only if it is async (a plain function never yields
        here, which is what keeps a group's callbacks free of awaits between them)."""
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("watch of %s: callback %s%r failed", self._what, getattr(fn, "__name__", fn), args[:1])
