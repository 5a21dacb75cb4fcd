"""Publishing to the audit stream: who changed what, kept in JetStream (`subjects.AUDIT_STREAM`).

    ensure_audit_stream(js, max_age=..., max_msgs=..., replicas=...)   the registry, at start
    audit = AuditLog(nc, clock, source="model-registry/r1", metrics=ctx.metrics)
    audit.record("registry", "SetTraffic", identity="token:admin", target="chat", detail={...})
    async for rec in read_records(js, kind="registry", since=datetime(...)): ...   `tierflow audit`

`record` never blocks and never raises: the operation it describes has happened (or been
refused) already, and an audit outage must not turn into a fabric outage. It hands the
record to a task that publishes it through JetStream (so a stored record is acknowledged)
and logs a warning when it cannot be stored (NATS down, the stream missing); past
`max_pending` records in flight, new ones are dropped, logged and counted instead of
queueing without bound. `flush` waits for those in flight (at shutdown, in tests).
Metric: `tierflow_audit_records_total{kind, outcome}` (stored | failed | dropped).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Final

import msgspec
import nats.errors

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter

from tierflow.contracts import audit as contract
from tierflow.contracts import subjects
from tierflow.runtime.clock import Clock
from tierflow.runtime.js_streams import ensure_stream

__all__ = ["AuditLog", "ensure_audit_stream", "read_records", "AuditStreamMissing", "DEFAULT_MAX_AGE", "DEFAULT_MAX_MSGS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE: Final = 90 * 86400.0  # seconds: a quarter's history
DEFAULT_MAX_MSGS: Final = 1_000_000


def _wanted(max_age: float, max_msgs: int, replicas: int) -> StreamConfig:
    # Limits retention (kept until too old or too many, whoever reads it), and no deletion of
    # single records or purges through the API: an audit trail is not edited after the fact.
    return StreamConfig(
        name=subjects.AUDIT_STREAM, subjects=[subjects.AUDIT_SUBJECTS], storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD, max_age=max_age or None, max_msgs=max_msgs or -1, num_replicas=replicas,
        deny_delete=True, deny_purge=True, description="tierflow audit: registry changes, node control, scaling actions",
    )  # fmt: skip


async def ensure_audit_stream(js: JetStreamContext, *, max_age: float = DEFAULT_MAX_AGE, max_msgs: int = DEFAULT_MAX_MSGS, replicas: int = 1) -> None:
    """Make the audit stream, or bring its retention and copies to these (idempotent).

    `max_age` in seconds and `max_msgs` bound what is kept (0: no bound); `replicas`
    copies on a cluster (one on a single server, which can hold no more)."""
    done, changed = await ensure_stream(js, _wanted(max_age, max_msgs, replicas), limits=("max_age", "max_msgs"))
    if done != "unchanged":
        log.info("audit stream %s %s", subjects.AUDIT_STREAM, done,
                 extra={"fields": {"max_age_s": max_age, "max_msgs": max_msgs, **changed}})  # fmt: skip


_NOT_IN_TOKEN: Final = re.compile(r"[^A-Za-z0-9_-]")


def speaker_of(source: str) -> str:
    """The subject token naming who records (`decode-node/decode-0` -> `decode-0`): a node's
    id is its NATS identity's, so its permissions can pin it; other instances (a host name
    with dots) are made to fit one token."""
    instance = source.rpartition("/")[2] or source
    return _NOT_IN_TOKEN.sub("_", instance)[:128] or "_"


class AuditLog:
    """Fire-and-forget audit records from one process (see the module docstring)."""

    def __init__(
        self, nc: NATS, clock: Clock, *, source: str, metrics: CollectorRegistry | None = None, max_pending: int = 1000, timeout: float = 2.0
    ) -> None:
        self._js = nc.jetstream()
        self._clock = clock
        self._source = source
        self._speaker = speaker_of(source)
        self._max_pending = max_pending
        self._timeout = timeout
        self._pending: set[asyncio.Task[None]] = set()
        self._counter = Counter("tierflow_audit_records", "Audit records this process published, by outcome (stored, failed, dropped)",
                                ["kind", "outcome"], registry=metrics) if metrics is not None else None  # fmt: skip

    def record(
        self, kind: contract.AuditKind, action: str, *, identity: str, target: str = "", ok: bool = True, detail: dict[str, Any] | None = None
    ) -> contract.AuditRecord:
        """Publish one record in the background; the record (also when it is dropped)."""
        rec = contract.AuditRecord(at=self._clock.now(), kind=kind, identity=identity or contract.ANONYMOUS, action=action, target=target,
                                   ok=ok, detail=detail or {}, source=self._source)  # fmt: skip
        if len(self._pending) >= self._max_pending:
            self._count(kind, "dropped")
            log.warning("audit record dropped: %d already waiting to be stored", len(self._pending), extra={"fields": self._fields(rec)})
            return rec
        task = asyncio.get_running_loop().create_task(self._send(rec), name=f"audit-{kind}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return rec

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most `timeout`) until every record handed over so far is stored or given up."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)

    async def _send(self, rec: contract.AuditRecord) -> None:
        try:
            await self._js.publish(subjects.audit(rec.kind, self._speaker), contract.encoder.encode(rec), timeout=self._timeout, stream=subjects.AUDIT_STREAM)
        except Exception as exc:  # nats-py raises several unrelated types; none may reach the caller
            self._count(rec.kind, "failed")
            log.warning(
                "audit record not stored (%s: %s); is NATS up, and has the model registry made stream %s?",
                type(exc).__name__, exc, subjects.AUDIT_STREAM, extra={"fields": self._fields(rec)},
            )  # fmt: skip
            return
        self._count(rec.kind, "stored")

    def _count(self, kind: str, outcome: str) -> None:
        if self._counter is not None:
            self._counter.labels(kind, outcome).inc()

    @staticmethod
    def _fields(rec: contract.AuditRecord) -> dict[str, Any]:
        return {"audit_kind": rec.kind, "action": rec.action, "target": rec.target, "identity": rec.identity, "ok": rec.ok}


class AuditStreamMissing(LookupError):
    """There is no audit stream (yet): the model registry makes it when it starts."""


async def read_records(
    js: JetStreamContext, *, kind: str = "", since: datetime | None = None, follow: bool = False, wait: float = 5.0
) -> AsyncIterator[contract.AuditRecord]:
    """The stream's records of `kind` (all kinds when empty) from `since` (the beginning when
    None), oldest first, through an ordered consumer (nothing durable is left behind).

    Without `follow` it ends once it has caught up (or nothing came for `wait` seconds);
    with it, it waits for new records until the caller stops iterating. Records this
    version cannot decode are skipped."""
    subject = subjects.audit_kind(kind) if kind else subjects.AUDIT_SUBJECTS
    policy = DeliverPolicy.BY_START_TIME if since is not None else DeliverPolicy.ALL
    try:
        sub = await js.subscribe(subject, stream=subjects.AUDIT_STREAM, ordered_consumer=True, deliver_policy=policy,
                                 config=ConsumerConfig(opt_start_time=since) if since is not None else None)  # fmt: skip
    except NotFoundError:
        raise AuditStreamMissing(f"no audit stream {subjects.AUDIT_STREAM} yet; the model registry makes it when it starts") from None
    try:
        if not follow:
            # Matching records = delivered so far + still pending, one snapshot of the server's:
            # a push consumer starts delivering at once, so `num_pending` alone may be 0 already.
            info = await sub.consumer_info()
            if not (info.num_pending or 0) + (info.delivered.consumer_seq if info.delivered else 0):
                return
        while True:
            try:
                msg = await sub.next_msg(timeout=None if follow else wait)
            except nats.errors.TimeoutError:
                return
            try:
                yield contract.audit_decoder.decode(msg.data)
            except msgspec.DecodeError:
                pass
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # the connection may be closing already
            pass
