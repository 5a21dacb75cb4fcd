"""The usage ledger's stream (`subjects.USAGE_STREAM`): made, read, and summed.

    await ensure_usage_stream(js, max_age=35 * 86400, replicas=3)     every router, at start
    async for rec in read_usage(js, since=t0): ...                     a restarting router, `tierflow usage`
    rows = summarize(records, by=("tenant", "model", "day"))           `tierflow usage`

Writing is the router's (services/router/usage_ledger.py: buffered, deduplicated by request
id); the record is tierflow.contracts.usage.UsageRecord.

Reading goes through an ordered consumer from a start time (nothing durable is left on the
server) and ends once it has caught up. The start is taken a margin earlier than asked and
records are filtered on their own `admitted_at`: the stream's timestamps are the NATS
server's, and a router's clock may run ahead of it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

import msgspec
import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from tierflow.contracts import subjects
from tierflow.contracts.usage import UsageRecord, batch_decoder, total_tokens
from tierflow.runtime.js_streams import ensure_stream

__all__ = [
    "DEFAULT_MAX_AGE",
    "DUPLICATE_WINDOW",
    "GROUPS",
    "UsageRow",
    "UsageSummary",
    "UsageStreamMissing",
    "ensure_usage_stream",
    "read_usage",
    "summarize",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE: Final = 35 * 86400.0  # seconds: a month's bill and a few days to spare
# How long the server remembers a record's Nats-Msg-Id: a publish retried within it (its
# acknowledgement was lost) is stored once. Readers drop repeats beyond it.
DUPLICATE_WINDOW: Final = 600.0
CLOCK_MARGIN: Final = 300.0  # seconds read before the asked start (server and router clocks differ)


class UsageStreamMissing(LookupError):
    """There is no usage stream (yet): a router makes it when it starts."""


def _wanted(max_age: float, replicas: int) -> StreamConfig:
    # Kept until too old, whoever reads it; no deleting or purging records through the API:
    # it is what tenants are charged (an admin may still delete the whole stream).
    return StreamConfig(
        name=subjects.USAGE_STREAM, subjects=[subjects.USAGE_SUBJECTS], storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD, max_age=max_age or None, duplicate_window=DUPLICATE_WINDOW, num_replicas=replicas,
        deny_delete=True, deny_purge=True, description="tierflow usage ledger: one record per admitted request",
    )  # fmt: skip


async def ensure_usage_stream(js: JetStreamContext, *, max_age: float = DEFAULT_MAX_AGE, replicas: int = 1) -> None:
    """Make the usage stream, or bring its retention and copies to these (idempotent: every
    router calls it at start). `max_age` in seconds (0: kept for ever); `replicas` copies
    on a cluster (one on a single server, which can hold no more)."""
    done, changed = await ensure_stream(js, _wanted(max_age, replicas))
    if done != "unchanged":
        log.info("usage stream %s %s", subjects.USAGE_STREAM, done, extra={"fields": {"max_age_s": max_age, **changed}})


async def read_usage(
    js: JetStreamContext, *, since: float | None = None, until: float | None = None, tenant: str = "", wait: float = 5.0
) -> AsyncIterator[UsageRecord]:
    """The ledger's records admitted in [since, until) (seconds since the epoch; None: no
    bound), of one tenant or all, oldest stored first, until caught up. Records this
    version cannot decode are skipped (and counted in a log line). A message holds one
    tenant's batch of records (a JSON array) or one record; a request id is yielded once."""
    subject = subjects.usage_of_tenant(tenant) if tenant else subjects.USAGE_SUBJECTS
    start = datetime.fromtimestamp(since - CLOCK_MARGIN, UTC) if since is not None else None
    try:
        sub = await js.subscribe(
            subject, stream=subjects.USAGE_STREAM, ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_TIME if start is not None else DeliverPolicy.ALL,
            config=ConsumerConfig(opt_start_time=start) if start is not None else None,
        )  # fmt: skip
    except NotFoundError:
        raise UsageStreamMissing(f"no usage stream {subjects.USAGE_STREAM} yet; a router makes it when it starts") from None
    undecodable = 0
    seen: set[str] = set()  # request ids read: each counts once (~100 bytes each, a window's worth)
    try:
        # Matching records = delivered so far + still pending (one snapshot of the server's).
        info = await sub.consumer_info()
        if not (info.num_pending or 0) + (info.delivered.consumer_seq if info.delivered else 0):
            return
        while True:
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                return
            try:
                decoded = batch_decoder.decode(msg.data)
            except msgspec.DecodeError:
                undecodable += 1
            else:
                for rec in decoded if isinstance(decoded, list) else (decoded,):
                    if rec.request_id in seen:
                        continue  # a record stored twice (noted twice): counted once
                    seen.add(rec.request_id)
                    if (since is None or rec.admitted_at >= since) and (until is None or rec.admitted_at < until) and (not tenant or rec.tenant == tenant):
                        yield rec
            if msg.metadata.num_pending == 0:
                return
    finally:
        if undecodable:
            log.warning("%d usage record(s) could not be decoded and were skipped", undecodable)
        try:
            await sub.unsubscribe()
        except Exception:  # the connection may be closing already
            pass


# --------------------------------------------------------------------------- summaries

GROUPS: Final[tuple[str, ...]] = ("tenant", "model", "version", "class", "router", "outcome", "day", "hour")


class UsageRow(msgspec.Struct, kw_only=True):
    """One group's totals (`summarize`): the group's keys, then its sums."""

    key: dict[str, str]
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    energy_j: float = 0.0
    errors: int = 0
    cancelled: int = 0


def _group_value(rec: UsageRecord, group: str) -> str:
    if group == "day":
        return datetime.fromtimestamp(rec.admitted_at, UTC).strftime("%Y-%m-%d")
    if group == "hour":
        return datetime.fromtimestamp(rec.admitted_at, UTC).strftime("%Y-%m-%dT%H:00")
    if group == "class":
        return rec.request_class
    return str(getattr(rec, group))


class UsageSummary:
    """Totals per group of `by` (names from `GROUPS`; days and hours in UTC, by admission),
    fed one record at a time (`tierflow usage` streams a month through it); a request id
    seen twice counts once. Pure."""

    def __init__(self, by: Sequence[str]) -> None:
        unknown = [g for g in by if g not in GROUPS]
        if unknown:
            raise ValueError(f"cannot group by {', '.join(unknown)}: choose from {', '.join(GROUPS)}")
        self.by = tuple(by)
        self._rows: dict[tuple[str, ...], UsageRow] = {}
        self._seen: set[str] = set()
        self.total = UsageRow(key={})

    def add(self, rec: UsageRecord) -> None:
        if rec.request_id in self._seen:
            return
        self._seen.add(rec.request_id)
        key = tuple(_group_value(rec, g) for g in self.by)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = UsageRow(key=dict(zip(self.by, key, strict=True)))
        for target in (row, self.total):
            target.requests += 1
            target.prompt_tokens += rec.prompt_tokens
            target.cached_tokens += rec.cached_tokens
            target.completion_tokens += rec.completion_tokens
            target.total_tokens += total_tokens(rec)
            target.energy_j += rec.energy_j or 0.0
            target.errors += rec.outcome == "error"
            target.cancelled += rec.outcome == "cancelled"

    def rows(self) -> list[UsageRow]:
        """The groups, sorted by key."""
        return [self._rows[k] for k in sorted(self._rows)]


def summarize(records: Iterable[UsageRecord], by: Sequence[str]) -> list[UsageRow]:
    """`UsageSummary` of `records`, its rows."""
    summary = UsageSummary(by)
    for rec in records:
        summary.add(rec)
    return summary.rows()
