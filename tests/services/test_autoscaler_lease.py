"""One active autoscaler: the lease in the autoscaler's KV bucket, on a real nats-server.

The keepers here run on a VirtualClock (rounds called one by one), so expiry is exact;
test_autoscaler_standby.py runs two real autoscaler processes against each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry

from tierflow.contracts import subjects
from tierflow.contracts.autoscaler import lease_decoder
from tierflow.runtime.clock import VirtualClock
from tierflow.services.autoscaler.lease import SAFETY, LeaseKeeper
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.removals import open_autoscaler_bucket

TTL = 10.0


@pytest.fixture
async def kv(private_nats_url: str) -> AsyncIterator[KeyValue]:
    nc: NATS = await nats.connect(private_nats_url)
    with contextlib.suppress(BucketNotFoundError, NotFoundError):
        await nc.jetstream().delete_key_value(subjects.AUTOSCALER_BUCKET)
    try:
        yield await open_autoscaler_bucket(nc.jetstream(), replicas=3)
    finally:
        await nc.drain()


class Keeper:
    """A LeaseKeeper with its metrics and the transitions it announced."""

    def __init__(self, kv: KeyValue, holder: str, clock: VirtualClock) -> None:
        self.metrics = CollectorRegistry()
        self.transitions: list[bool] = []
        self.broken = False

        async def bucket() -> KeyValue:
            if self.broken:
                raise ConnectionError("nats: connection closed")
            return kv

        self.lease = LeaseKeeper(bucket, holder, TTL, clock, AutoscalerMetrics(self.metrics))

        async def on_change(active: bool) -> None:
            self.transitions.append(active)

        self.lease.on_change.append(on_change)

    @property
    def leader(self) -> float | None:
        return self.metrics.get_sample_value("tierflow_autoscaler_leader")


async def record(kv: KeyValue):  # type: ignore[no-untyped-def]
    return lease_decoder.decode((await kv.get(subjects.AUTOSCALER_LEASE_KEY)).value)


async def test_one_holder_and_a_standby_that_takes_over_only_once_the_lease_expired(kv: KeyValue) -> None:
    clock = VirtualClock(100.0)
    a, b = Keeper(kv, "as-a", clock), Keeper(kv, "as-b", clock)
    await a.lease.keep()
    await b.lease.keep()
    assert a.lease.may_act() and not b.lease.active
    assert (a.leader, b.leader) == (1.0, 0.0) and a.transitions == [True] and b.transitions == []
    assert (await record(kv)).holder == "as-a" and a.lease.term == 1
    for _ in range(5):  # renewed every round: the standby never gets it
        clock.advance(TTL / 2)
        await a.lease.keep()
        await b.lease.keep()
        assert a.lease.may_act() and not b.lease.active
    # a stops renewing (killed, paused, cut off): it stops acting before b may start
    clock.advance(TTL * (1 - SAFETY))
    assert not a.lease.may_act()
    await b.lease.keep()
    assert not b.lease.active  # b saw a's last renewal when it was made: a whole ttl must pass
    clock.advance(TTL * SAFETY - 0.05)
    await b.lease.keep()
    assert not b.lease.active
    clock.advance(0.1)
    await b.lease.keep()
    assert b.lease.may_act() and b.lease.term == 2 and b.transitions == [True]
    held = await record(kv)
    assert (held.holder, held.term, held.ttl_s) == ("as-b", 2, TTL)
    # a wakes up: its renewal loses the compare-and-set; it stands down and says so
    await a.lease.keep()
    assert not a.lease.active and a.transitions == [True, False] and a.leader == 0.0
    await a.lease.keep()
    assert not a.lease.active  # and stands by: b renews from here on
    await b.lease.keep()
    assert b.lease.may_act()


async def test_a_standby_started_late_waits_a_whole_ttl_from_when_it_first_looked(kv: KeyValue) -> None:
    """The record's wall-clock expiry is not trusted (clocks differ): a standby counts
    from its own first sight of the revision, so it never takes over early."""
    clock = VirtualClock(0.0)
    a = Keeper(kv, "as-a", clock)
    await a.lease.keep()
    clock.advance(5 * TTL)  # a died long ago
    b = Keeper(kv, "as-b", clock)
    await b.lease.keep()
    assert not b.lease.active
    clock.advance(TTL)
    await b.lease.keep()
    assert b.lease.may_act() and b.lease.term == 2


async def test_a_released_lease_passes_at_once(kv: KeyValue) -> None:
    clock = VirtualClock(0.0)
    a, b = Keeper(kv, "as-a", clock), Keeper(kv, "as-b", clock)
    await a.lease.keep()
    await b.lease.keep()
    await a.lease.release()
    assert not a.lease.may_act() and a.leader == 0.0
    held = await record(kv)
    assert (held.holder, held.term) == ("", 1)
    await b.lease.keep()  # no ttl to wait out
    assert b.lease.may_act() and b.lease.term == 2


async def test_a_holder_that_cannot_renew_stops_acting_before_anyone_may_take_over(kv: KeyValue) -> None:
    clock = VirtualClock(0.0)
    a = Keeper(kv, "as-a", clock)
    await a.lease.keep()
    a.broken = True  # NATS is down
    clock.advance(TTL / 2)
    await a.lease.keep()
    assert a.lease.may_act() and a.transitions == [True]  # still inside its lease
    clock.advance(TTL / 2)
    assert not a.lease.may_act()  # fenced by time alone, before its loop notices
    await a.lease.keep()
    assert not a.lease.active and a.transitions == [True, False]
    a.broken = False  # NATS is back and nobody took the lease: it still names a, which stopped acting
    await a.lease.keep()
    assert a.lease.may_act() and a.lease.term == 2 and a.transitions == [True, False, True]


async def test_two_standbys_racing_for_an_expired_lease_one_wins(kv: KeyValue) -> None:
    clock = VirtualClock(0.0)
    a, b, c = Keeper(kv, "as-a", clock), Keeper(kv, "as-b", clock), Keeper(kv, "as-c", clock)
    await a.lease.keep()
    await b.lease.keep()
    await c.lease.keep()
    clock.advance(TTL)
    await b.lease.keep()
    await c.lease.keep()
    assert [b.lease.active, c.lease.active] == [True, False]
    await c.lease.keep()
    assert not c.lease.active and (await record(kv)).holder == "as-b"
