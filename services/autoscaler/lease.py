"""One active autoscaler at a time: a lease in the autoscaler's KV bucket.

The `lease` key holds `contracts.autoscaler.Lease` (holder, term, ttl). Every round
(`keep`, once per tick interval, `run` loops it):

- the holder renews it with compare-and-set on the revision it last wrote. A lost
  compare-and-set means another instance took it over: the holder stands down at once.
  A renewal that fails otherwise (NATS down) is retried; once the lease could have
  expired the holder stands down too.
- a standby reads it. Released (holder empty), absent, or still naming this very
  instance in the term it held (it stood down when NATS cut it off, and nobody took
  over): it takes it (compare-and-set, term + 1) at once. Held by another: it notes
  the revision and when *it* first saw it, and takes it over only once that revision has
  gone unchanged for the lease's ttl on its own clock.

Why revisions and a local clock, not the wall-clock `expires_at` in the record: two
machines' clocks need not agree, but a revision does not change unless the holder
renewed, and a reader saw it at or after it was written. So a standby takes over no
earlier than ttl after the holder's last successful renewal was *sent*, while the holder
stops acting `SAFETY` of a ttl before that (clock rates may differ a little): whoever
acts holds an unexpired lease. `may_act()` is checked before every start, drain,
uncordon and stop, so a holder whose renewals stall stops acting without waiting for
its loop to notice. (This is how Kubernetes' client-go leader election judges expiry.)

The term grows with every change of holder; removal records carry it (removals.py).
Transitions are logged, counted in `tierflow_autoscaler_leader` (0/1) and
`tierflow_autoscaler_lease_term`, and passed to `on_change` callbacks (the service
stands its removals down, main.py re-announces itself as active or standby).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tierflow.contracts import messages, subjects
from tierflow.contracts.autoscaler import Lease, lease_decoder
from tierflow.runtime.clock import Clock
from tierflow.runtime.waiting import first
from tierflow.services.autoscaler.metrics import AutoscalerMetrics

__all__ = ["LeaseKeeper", "SAFETY"]

log = logging.getLogger("tierflow.autoscaler")
SAFETY = 0.1  # the holder stops acting this fraction of a ttl before a standby may take over
OnChange = Callable[[bool], Awaitable[None]]


class LeaseKeeper:
    def __init__(
        self,
        bucket: Callable[[], Awaitable[KeyValue]],
        holder: str,
        ttl: float,
        clock: Clock,
        metrics: AutoscalerMetrics | None = None,
        *,
        wall: Callable[[], float] | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.holder = holder
        self.ttl = ttl
        self.term = 0  # the term this instance holds (or last held)
        self.on_change: list[OnChange] = []
        self._bucket = bucket
        self._clock = clock
        self._wall = wall or clock.now
        self._metrics = metrics
        self._held = False
        self._revision = 0  # of the lease record this instance last wrote
        self._valid_until = float("-inf")  # own monotonic clock
        self._seen: tuple[int, float] | None = None  # (revision, when first seen) of another's lease
        self._seen_holder = ""
        self._last_term = 0  # the highest term seen in the record
        self._timeout = max(0.2, min(5.0, ttl / 3))  # one KV call: well inside a ttl

    # -- reading ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """This instance holds the lease (by its own account; `may_act` adds the time)."""
        return self._held

    def may_act(self) -> bool:
        """True while no other instance can have taken the lease over."""
        return self._held and self._clock.monotonic() < self._valid_until

    # -- the rounds -------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event, interval: float) -> None:
        """Keep (or wait for) the lease every `interval` until `stopping`."""
        while not stopping.is_set():
            await self.keep()
            wait = interval
            if self._held:  # wake in time to notice an expiry the renewals could not prevent
                wait = max(0.0, min(interval, self._valid_until - self._clock.monotonic()))
            await first(self._clock.sleep(wait), stopping.wait())

    async def keep(self) -> None:
        """One round: renew the lease if held, else see whether it can be taken."""
        if self._held:
            await self._renew()
        else:
            await self._try_take()

    async def _call(self, op: Awaitable[int]) -> int:
        return await asyncio.wait_for(op, self._timeout)

    def _record(self, holder: str, term: int) -> bytes:
        wall = self._wall()
        return messages.encoder.encode(Lease(holder=holder, term=term, ttl_s=self.ttl, renewed_at=wall, expires_at=wall + self.ttl))

    async def _renew(self) -> None:
        sent = self._clock.monotonic()
        try:
            kv = await self._bucket()
            try:
                self._revision = await self._call(kv.update(subjects.AUTOSCALER_LEASE_KEY, self._record(self.holder, self.term), last=self._revision))
            except KeyWrongLastSequenceError:
                current, revision = await self._read(kv)
                if current is None or (current.holder, current.term) != (self.holder, self.term):
                    who = f"{current.holder} (term {current.term})" if current is not None else "nobody (the lease was deleted)"
                    await self._lose(f"the lease is now held by {who}")
                    return
                # Our own renewal landed but its answer was lost: carry on from that revision.
                self._revision = await self._call(kv.update(subjects.AUTOSCALER_LEASE_KEY, self._record(self.holder, self.term), last=revision))
        except Exception as exc:  # NATS down or slow: retry next round, unless it is too late
            if self._clock.monotonic() >= self._valid_until:
                await self._lose(f"could not renew the lease for {self.ttl:g}s ({type(exc).__name__}: {exc})")
            else:
                log.warning("autoscaler %s could not renew its lease (%s: %s); acting until %.1fs from now",
                            self.holder, type(exc).__name__, exc, self._valid_until - self._clock.monotonic())  # fmt: skip
            return
        self._valid_until = sent + self.ttl * (1 - SAFETY)

    async def _read(self, kv: KeyValue) -> tuple[Lease | None, int]:
        """The lease record and its revision (None, 0: there is none)."""
        try:
            entry = await asyncio.wait_for(kv.get(subjects.AUTOSCALER_LEASE_KEY), self._timeout)
        except KeyNotFoundError:
            return None, 0
        lease = lease_decoder.decode(entry.value) if entry.value else None
        return lease, entry.revision or 0

    async def _try_take(self) -> None:
        try:
            kv = await self._bucket()
            lease, revision = await self._read(kv)
        except Exception as exc:
            log.debug("autoscaler %s cannot read the lease: %s", self.holder, exc)
            return
        now = self._clock.monotonic()
        if lease is None:
            await self._take(kv, None, self._last_term + 1, "no lease yet")
            return
        self._last_term = max(self._last_term, lease.term)
        if not lease.holder:
            await self._take(kv, revision, lease.term + 1, f"released by its last holder (term {lease.term})")
        elif lease.holder == self.holder and lease.term == self.term:
            await self._take(kv, revision, lease.term + 1, "the lease still names this instance (its own term), which stopped acting")
        elif self._seen is None or self._seen[0] != revision:
            if lease.holder != self._seen_holder:
                log.info("autoscaler %s stands by: %s holds the lease (term %d)", self.holder, lease.holder, lease.term,
                         extra={"fields": {"holder": lease.holder, "term": lease.term, "role": "standby"}})  # fmt: skip
                self._seen_holder = lease.holder
            self._seen = (revision, now)
        elif now - self._seen[1] >= lease.ttl_s:
            await self._take(kv, revision, lease.term + 1, f"{lease.holder}'s lease (term {lease.term}) expired: not renewed for {now - self._seen[1]:.1f}s")

    async def _take(self, kv: KeyValue, revision: int | None, term: int, why: str) -> None:
        sent = self._clock.monotonic()
        record = self._record(self.holder, term)
        try:
            if revision is None:
                self._revision = await self._call(kv.create(subjects.AUTOSCALER_LEASE_KEY, record))
            else:
                self._revision = await self._call(kv.update(subjects.AUTOSCALER_LEASE_KEY, record, last=revision))
        except KeyWrongLastSequenceError:
            log.info("autoscaler %s: another standby took the lease first", self.holder)
            self._seen = None
            return
        except Exception as exc:
            log.warning("autoscaler %s could not take the lease (%s: %s)", self.holder, type(exc).__name__, exc)
            return
        self._held, self.term, self._last_term, self._seen = True, term, term, None
        self._valid_until = sent + self.ttl * (1 - SAFETY)
        log.info("autoscaler %s is active (term %d): %s", self.holder, term, why,
                 extra={"fields": {"holder": self.holder, "term": term, "role": "active", "reason": why}})  # fmt: skip
        await self._changed(True)

    async def _lose(self, why: str) -> None:
        self._held, self._seen, self._seen_holder = False, None, ""
        self._valid_until = float("-inf")
        log.warning("autoscaler %s stands down (term %d): %s", self.holder, self.term, why,
                    extra={"fields": {"holder": self.holder, "term": self.term, "role": "standby", "reason": why}})  # fmt: skip
        await self._changed(False)

    async def _changed(self, active: bool) -> None:
        if self._metrics is not None:
            self._metrics.leader.set(1.0 if active else 0.0)
            self._metrics.lease_term.set(self.term)
        for callback in list(self.on_change):
            try:
                await callback(active)
            except Exception:  # one listener's failure must not cost the lease loop
                log.exception("autoscaler %s: a lease listener failed", self.holder)

    async def release(self) -> None:
        """Hand the lease back (a clean stop): a standby takes it at its next round,
        without waiting out the ttl."""
        if not self._held:
            return
        self._held, self._valid_until = False, float("-inf")
        try:
            kv = await self._bucket()
            await self._call(kv.update(subjects.AUTOSCALER_LEASE_KEY, self._record("", self.term), last=self._revision))
        except Exception as exc:  # lost it already, or NATS is down: it expires instead
            log.info("autoscaler %s did not release its lease (%s: %s); it expires in %gs", self.holder, type(exc).__name__, exc, self.ttl)
        else:
            log.info("autoscaler %s released the lease (term %d)", self.holder, self.term,
                     extra={"fields": {"holder": self.holder, "term": self.term, "role": "released"}})  # fmt: skip
        if self._metrics is not None:
            self._metrics.leader.set(0.0)
