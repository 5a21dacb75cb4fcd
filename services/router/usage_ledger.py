"""The router's side of the usage ledger: every admitted request's record, published to JetStream.

    ledger = UsageLedger(nc.jetstream(), router_id, clock, registry=ctx.metrics)
    await restore_usage(js, tenants, router_id, clock, started_at)   at start, before the ports open
    dispatcher = Dispatcher(..., on_usage=ledger.note)
    task = asyncio.create_task(ledger.run(stopping))                 one task flushes the buffer
    await ledger.close()                                             at shutdown: the rest, whole

`note` is what the dispatcher calls when a request its tenant admitted ends (once, after
its quota reservation settled): it builds the `UsageRecord` (tierflow.contracts.usage) and
appends it to a bounded buffer; it never does I/O itself. One task publishes what the
buffer holds as one JetStream message per tenant (a JSON array of up to `batch` records;
the router's CPU per request was ~190 us higher with a publish and an acknowledgement per
record), with `Nats-Msg-Id` = the router and the batch's first request id, so a batch
retried after a lost acknowledgement is stored once (the stream's duplicate window); a
failed batch is kept whole and retried after a backoff. Readers count a request id once.
A full buffer (NATS down for long) drops the new record: counted, and logged with every
field of the record, so it can still be billed from the log.

For a finished request `note` also returns a wait, which the dispatcher awaits before the
answer reports its usage: until the record is acknowledged, at most `ack_wait` seconds.
The answers of one flush share one future and one timer (no task or timer per request).
Why: a record still in this process's buffer dies with it, so without the wait a router
killed right after an answer could restart without that answer's usage (measured: 1 run
in 10 of the kill test restored one record short and admitted past the quota). The wait
is one JetStream round trip at the end of an answer (never before its first token); in a
JetStream outage it is bounded by `ack_wait` and the record stays buffered. `ack_wait` 0
never waits (fire and forget).

Metrics: `tierflow_router_usage_records_total{result}` (stored | duplicate | failed
publish attempts | dropped), `tierflow_router_usage_buffered` (waiting to be stored),
`tierflow_router_usage_restored` (1 once the quotas were rebuilt from the ledger), and per
tenant with a quota `tierflow_router_quota_{reserved,used,limit}_tokens` (read at scrape).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Iterator
from typing import Final

from nats.js.client import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierflow.contracts import subjects
from tierflow.contracts.usage import UsageRecord, encoder
from tierflow.placement import TenantDirectory
from tierflow.placement.tenants import UsageTally
from tierflow.runtime.clock import Clock
from tierflow.runtime.usage_stream import read_usage
from tierflow.services.router.dispatch import RequestRecord

__all__ = ["UsageLedger", "QuotaCollector", "restore_usage"]

log = logging.getLogger(__name__)

_MSG_ID: Final = "Nats-Msg-Id"
_BACKOFF: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # seconds between attempts while NATS fails


class _Generation:
    """The records noted between two flushes, and the answers that wait for them: one future
    for all, set when every batch of them is stored or when `ack_wait` runs out."""

    __slots__ = ("future", "pending", "answers", "timer")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.pending = 0  # batches of it not stored yet
        self.answers = 0  # answers awaiting `future`
        self.timer: asyncio.TimerHandle | None = None

    def settle(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
        if self.timer is not None:
            self.timer.cancel()


class _Batch:
    """One tenant's records in one message: kept whole until stored, so a retry is the same
    message under the same `Nats-Msg-Id` (and deduplicated if the first one was stored)."""

    __slots__ = ("records", "subject", "msg_id", "payload", "generation")

    def __init__(self, records: list[UsageRecord], subject: str, msg_id: str, generation: _Generation) -> None:
        self.records = records
        self.subject = subject
        self.msg_id = msg_id
        self.payload = encoder.encode(records)
        self.generation = generation


class UsageLedger:
    """A bounded buffer of usage records and the task that stores them (see the module docstring)."""

    def __init__(
        self, js: JetStreamContext, router_id: str, clock: Clock, *, registry: CollectorRegistry | None = None,
        capacity: int = 100_000, batch: int = 256, timeout: float = 2.0, ack_wait: float = 0.25,
    ) -> None:
        registry = registry if registry is not None else CollectorRegistry()  # a test's ledger: metrics of its own
        self._js = js
        self._router = subjects.check_token(router_id, "router id")
        self._clock = clock
        self._capacity = capacity
        self._batch = batch
        self._timeout = timeout
        self._ack_wait = ack_wait
        self._buffer: list[UsageRecord] = []  # noted since the last flush
        self._generation: _Generation | None = None  # their answers' wait
        self._retry: deque[_Batch] = deque()  # batches whose publish failed, oldest first
        self._retrying = 0  # records in them
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._subjects: dict[str, str] = {}  # tenant -> its subject (tenants are configured: a bounded map)
        counter = Counter("tierflow_router_usage_records", "Usage ledger records: stored, duplicate (already stored: a retried publish), "
                          "failed (records in failed publish attempts; retried), dropped (the buffer was full)", ["result"], registry=registry)  # fmt: skip
        self._stored, self._duplicate, self._failed, self._dropped = (counter.labels(r) for r in ("stored", "duplicate", "failed", "dropped"))
        self._late = Counter("tierflow_router_usage_late_answers", "Answers that went out before their usage record was stored "
                             "(the wait for its acknowledgement, usage_ack_wait, ran out)", registry=registry)  # fmt: skip
        Gauge("tierflow_router_usage_buffered", "Usage records waiting to be stored in the ledger", registry=registry).set_function(
            lambda: self.buffered)

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self._retrying

    def note(self, record: RequestRecord) -> Awaitable[None] | None:
        """A request its tenant admitted has ended: queue its record (no I/O, never raises).
        For a finished one (outcome ok), the wait for its acknowledgement (see the module
        docstring), which the caller must await; None otherwise."""
        prompt, cached, completion = record.charged()
        rec = UsageRecord(
            request_id=record.request_id, tenant=record.tenant, model=record.model, version=record.version,
            request_class=record.request_class, api=record.api, prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=completion, energy_j=round(record.energy_j, 6) if record.finish_reason else None,
            outcome=record.outcome, status=record.status, error=record.error, finish_reason=record.finish_reason,  # type: ignore[arg-type]
            router=self._router, admitted_at=record.admitted_at, at=self._clock.now(),
        )  # fmt: skip
        if self.buffered >= self._capacity:
            self._dropped.inc()
            log.warning("usage record dropped: %d already wait to be stored (is NATS reachable?); the record follows", self.buffered,
                        extra={"fields": {"usage_record": encoder.encode(rec).decode()}})  # fmt: skip
            return None
        self._buffer.append(rec)
        generation = self._generation
        if generation is None:
            loop = asyncio.get_running_loop()
            generation = self._generation = _Generation(loop.create_future())
            if self._ack_wait > 0:
                generation.timer = loop.call_later(self._ack_wait, self._expire, generation)
        if self._idle.is_set():
            self._idle.clear()
        self._wake.set()
        if self._ack_wait > 0 and rec.outcome == "ok":
            generation.answers += 1
            return generation.future
        return None

    def _expire(self, generation: _Generation) -> None:
        """`ack_wait` ran out before the records of `generation` were all stored: its answers go out."""
        generation.timer = None
        if not generation.future.done():
            self._late.inc(generation.answers)
            generation.future.set_result(None)

    def _subject(self, tenant: str) -> str:
        subject = self._subjects.get(tenant)
        if subject is None:
            subject = self._subjects[tenant] = subjects.usage(tenant, self._router)
        return subject

    def _batches(self) -> list[_Batch]:
        """The buffer as one batch per tenant (at most `batch` records each), in order."""
        records, self._buffer = self._buffer, []
        generation, self._generation = self._generation, None
        assert generation is not None
        by_tenant: dict[str, list[UsageRecord]] = {}
        for rec in records:
            group = by_tenant.get(rec.tenant)
            if group is None:
                group = by_tenant[rec.tenant] = []
            group.append(rec)
        batches = []
        for tenant, group in by_tenant.items():
            for i in range(0, len(group), self._batch):
                chunk = group[i : i + self._batch]
                batches.append(_Batch(chunk, self._subject(tenant), f"{self._router}:{chunk[0].request_id}", generation))
        generation.pending = len(batches)
        return batches

    async def _publish(self, batch: _Batch) -> bool:
        try:
            ack = await self._js.publish(batch.subject, batch.payload, timeout=self._timeout, stream=subjects.USAGE_STREAM,
                                         headers={_MSG_ID: batch.msg_id})  # fmt: skip
        except Exception as exc:  # nats-py raises several unrelated types; none may end the task
            self._failed.inc(len(batch.records))
            log.debug("usage batch %s (%d records) not stored yet: %s: %s", batch.msg_id, len(batch.records), type(exc).__name__, exc)
            return False
        (self._duplicate if ack.duplicate else self._stored).inc(len(batch.records))
        return True

    async def _flush_once(self) -> bool:
        """Publish the batches that failed before, then the buffer's; False if any publish
        failed (those are kept whole, in order, for the next attempt)."""
        batches = list(self._retry)
        self._retry.clear()
        self._retrying = 0
        if self._buffer:
            batches.extend(self._batches())
        results = await asyncio.gather(*(self._publish(batch) for batch in batches))
        ok = True
        for batch, stored in zip(batches, results, strict=True):
            if not stored:
                ok = False
                self._retry.append(batch)
                self._retrying += len(batch.records)
                continue
            generation = batch.generation
            generation.pending -= 1
            if generation.pending == 0:
                generation.settle()
        if not self._buffer and not self._retry:
            self._idle.set()
        return ok

    async def run(self, stopping: asyncio.Event) -> None:
        """Store what is buffered, as it comes, until `stopping` (then `close` stores the rest)."""
        failures = 0
        while not stopping.is_set():
            if not self._buffer and not self._retry:
                self._idle.set()
                self._wake.clear()
                stop = asyncio.ensure_future(stopping.wait())
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((stop, wake), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    wake.cancel()
                continue
            self._wake.clear()
            if await self._flush_once():
                failures = 0
                continue
            if failures == 0 or failures % 20 == 0:
                log.warning("usage ledger: %d record(s) wait to be stored in stream %s (publishes fail; retrying)",
                            self.buffered, subjects.USAGE_STREAM)  # fmt: skip
            delay = _BACKOFF[min(failures, len(_BACKOFF) - 1)]
            failures += 1
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except TimeoutError:
                pass

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most `timeout`) until the buffer is empty (tests; the run task stores it)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass

    async def close(self, timeout: float = 5.0) -> None:
        """At shutdown, after the front doors closed: store what is left, for at most `timeout`;
        what still could not be stored is logged, record by record."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._buffer or self._retry) and loop.time() < deadline:
            if not await self._flush_once():
                await asyncio.sleep(0.1)
        left = [*(rec for batch in self._retry for rec in batch.records), *self._buffer]
        for rec in left:
            self._dropped.inc()
            log.warning("usage record not stored before shutdown; the record follows", extra={"fields": {"usage_record": encoder.encode(rec).decode()}})
        for batch in self._retry:
            batch.generation.settle()
        if self._generation is not None:
            self._generation.settle()
            self._generation = None
        self._buffer.clear()
        self._retry.clear()
        self._retrying = 0
        self._idle.set()


async def restore_usage(js: JetStreamContext, tenants: TenantDirectory, router_id: str, clock: Clock, started_at: float) -> int:
    """Rebuild the tenants' quotas and rate buckets from the ledger (`TenantDirectory.restore`):
    the records admitted since the earliest window any limit needs. Returns how many were read."""
    now = clock.now()
    since = tenants.restore_since(now)
    if since is None:
        return 0
    tally = UsageTally(tenants, router=router_id, now=now, started_at=started_at)
    count = 0
    async for rec in read_usage(js, since=since):
        tally.add(rec)
        count += 1
    restored = tally.apply()
    for tenant, (own, others) in restored.items():
        if own or others:
            log.info("tenant %s: %d tokens of this quota window restored from the usage ledger (%d this router's, %d other routers')",
                     tenant, own + others, own, others, extra={"fields": {"tenant": tenant, "own_tokens": own, "other_tokens": others}})  # fmt: skip
    return count


class QuotaCollector(Collector):
    """Each quota's state per tenant, read when Prometheus scrapes (nothing per request)."""

    def __init__(self, tenants: TenantDirectory, clock: Clock, restored: asyncio.Event) -> None:
        self._tenants = tenants
        self._clock = clock
        self._restored = restored

    def collect(self) -> Iterator[Metric]:
        now = self._clock.now()
        reserved = GaugeMetricFamily("tierflow_router_quota_reserved_tokens", "Tokens held by the tenant's requests still running", labels=["tenant"])
        used = GaugeMetricFamily("tierflow_router_quota_used_tokens", "Tokens this router charged the tenant in the current quota window", labels=["tenant"])
        limit = GaugeMetricFamily("tierflow_router_quota_limit_tokens", "The tenant's tokens per window this router may admit (its share)", labels=["tenant"])
        for name, tenant in self._tenants.tenants.items():
            quota = tenant.quota
            if quota is None:
                continue
            reserved.add_metric([name], quota.held(now))
            used.add_metric([name], quota.used(now))
            limit.add_metric([name], quota.effective_limit(now))
        restored = GaugeMetricFamily("tierflow_router_usage_restored", "1 once this router rebuilt its quotas and rate buckets from the usage ledger")
        restored.add_metric([], 1.0 if self._restored.is_set() else 0.0)
        yield from (reserved, used, limit, restored)
