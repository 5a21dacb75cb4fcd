"""Admission shared by request class and tenant weight (issue 21): the rules, pure.

A model of 16 batch slots and a limit of 24 (the default initial queue of half the
slots) unless a test says otherwise. The flood tries far more than its share; the steady
tenant never more than a few at a time.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from prometheus_client import CollectorRegistry

from tierflow.placement.admission import Admission, AdmissionConfig, Ticket
from tierflow.placement.classes import CLASSES
from tierflow.runtime.errors import RateLimited
from tierflow.services.router.metrics import AdmissionCollector

M = "chat"
SLOTS = 16


def _admission(**config: float) -> Admission:
    admission = Admission(AdmissionConfig(**config))  # type: ignore[arg-type]
    admission.set_capacity(M, SLOTS)
    return admission


def _fill(admission: Admission, tenant: str, now: float = 0.0, *, weight: float = 1.0, request_class: str = "standard", most: int = 1000) -> list[Ticket]:
    """Admit `tenant` until it is refused (or `most` times)."""
    held = []
    for _ in range(most):
        try:
            held.append(admission.admit(M, now, tenant=tenant, weight=weight, request_class=request_class))
        except RateLimited:
            break
    return held


def _flow(admission: Admission, tenant: str, request_class: str = "standard") -> int:
    return next((f.in_flight for f in admission.flows() if f.tenant == tenant and f.request_class == request_class), 0)


# ------------------------------------------------------------------------ sharing
def test_a_flood_of_24x_never_refuses_the_steady_tenant_under_its_share() -> None:
    """Random arrivals and departures for 1,000 s: the flood keeps 48 callers trying, the
    steady tenant 2; the steady tenant is never refused, and the model goes over its
    limit by no more than the steady tenant holds."""
    rng = random.Random(21)
    admission = _admission()
    limit = admission.stats(M).limit
    assert limit == 24
    held: list[tuple[float, str, Ticket]] = []
    flood_refused = 0
    now = 0.0
    while now < 1000.0:
        now += rng.expovariate(20.0)
        for ends, tenant, ticket in [h for h in held if h[0] <= now]:
            ticket.release(ends)
            held.remove((ends, tenant, ticket))
        steady = sum(1 for _, t, _ in held if t == "steady")
        who = "steady" if steady < 2 and rng.random() < 0.1 else "flood"
        try:
            ticket = admission.admit(M, now, tenant=who)
        except RateLimited as refusal:
            assert who == "flood", f"the steady tenant was refused with {steady} in flight: {refusal.message}"
            flood_refused += 1
            continue
        held.append((now + rng.uniform(1.0, 3.0), who, ticket))
        assert admission.stats(M).in_flight <= limit + 2
    assert flood_refused > 500  # the flood was over its share most of the time


def test_weights_split_the_limit() -> None:
    """Two floods of weights 1 and 3: the heavy one, under its share of 18, goes over the
    limit by at most that; the light one, over its 6, is refused until it is back at it."""
    admission = _admission(headroom=0.0)
    light = _fill(admission, "light", weight=1.0, most=12)
    heavy = _fill(admission, "heavy", weight=3.0)
    assert (len(light), len(heavy)) == (12, 18)  # 12 each under the limit, then heavy to its share
    assert admission.stats(M).in_flight == 30  # the limit of 24 and 6 of heavy's entitlement
    for ticket in light[:6]:  # the light tenant's excess leaves; nobody may take its place
        ticket.release(1.0)
        assert not _fill(admission, "heavy", 1.0, weight=3.0)
    assert (_flow(admission, "light"), _flow(admission, "heavy")) == (6, 18) and admission.stats(M).in_flight == 24
    with pytest.raises(RateLimited) as refused:
        admission.admit(M, 1.0, tenant="heavy", weight=3.0)
    assert refused.value.code == "fair_share_exceeded"
    assert "tenant 'heavy' has 18 of them, at or over its share of 18.0 of the limit of 24 (weight 3 of 4 active" in refused.value.message
    light += _fill(admission, "light", 1.0, weight=1.0)  # at 6 of its 6: nothing more
    assert _flow(admission, "light") == 6


def test_interactive_takes_the_slot_batch_would_have_taken() -> None:
    """A batch flood holds the whole limit; interactive requests still get in (over the
    limit: they are entitled to all of it) while batch is refused until they are done,
    except the trickle the class floor keeps."""
    admission = _admission(headroom=0.0, class_floor=0.05)
    batch = _fill(admission, "bulk", request_class="batch")
    assert len(batch) == 24
    interactive = _fill(admission, "chat", request_class="interactive", most=10)
    assert len(interactive) == 10 and admission.stats(M).in_flight == 34
    assert admission.stats(M).in_flight_by_class == {"interactive": 10, "standard": 0, "batch": 24}
    for ticket in batch[:20]:
        ticket.release(1.0)
    # 14 in flight, under the limit of 24: anyone may come in; at the limit again batch
    # is entitled to 24 - 10 = 14 and holds 4 + 10 = 14 after the fill
    assert len(_fill(admission, "bulk", 1.0, request_class="batch")) == 10
    with pytest.raises(RateLimited):
        admission.admit(M, 1.0, tenant="bulk", request_class="batch")
    interactive += _fill(admission, "chat", 1.0, request_class="interactive", most=30)
    assert _flow(admission, "chat", "interactive") == 24  # the whole limit, whatever batch holds
    for ticket in batch[20:]:
        ticket.release(2.0)
    assert _flow(admission, "bulk", "batch") == 10  # the ones admitted at 1.0 above
    # Starvation protection: batch keeps 5% of the limit (1.2 requests) under any
    # interactive load; a batch tenant with nothing in flight always gets one.
    assert len(_fill(admission, "other-bulk", 2.0, request_class="batch")) == 1


def test_shares_follow_tenants_as_they_come_and_go() -> None:
    admission = _admission(headroom=0.0, idle_grace_s=5.0)
    a = _fill(admission, "a")
    assert len(a) == 24  # alone: the whole limit
    b = _fill(admission, "b", 0.0, most=1)  # the first of a newcomer is always under its share
    assert len(b) == 1 and admission.stats(M).in_flight == 25
    for ticket in a[:8]:
        ticket.release(1.0)
    b += _fill(admission, "b", 1.0)
    assert len(b) == 12  # b: to its half of the limit
    assert len(_fill(admission, "a", 1.0)) == 0  # a: 16 held, over its 12
    c = _fill(admission, "c", 1.0)  # a third tenant: shares of 8 each, and c is under its own
    assert len(c) == 8 and admission.stats(M).in_flight == 36
    for ticket in a[8:16]:
        ticket.release(2.0)
    assert _flow(admission, "a") == 8
    assert len(_fill(admission, "b", 2.0)) == len(_fill(admission, "c", 2.0)) == 0  # b and c at or over their 8
    for ticket in [*b, *c]:
        ticket.release(3.0)  # b and c leave: within the grace they still count
    assert len(_fill(admission, "a", 4.0)) == 16  # under the limit: a takes it all back
    with pytest.raises(RateLimited, match=r"share of 8\.0 of the limit of 24 \(weight 1 of 3 active"):
        admission.admit(M, 7.9, tenant="a")
    with pytest.raises(RateLimited) as alone:  # past the grace: alone again, the model's limit only
        admission.admit(M, 8.1, tenant="a")
    assert alone.value.code == "overloaded" and "tenant" not in alone.value.message


def test_headroom_is_kept_for_a_tenant_under_its_share_and_only_then() -> None:
    admission = _admission(headroom=0.125, idle_grace_s=5.0)  # 2 of the 16 slots
    steady = [admission.admit(M, 0.0, tenant="steady")]
    flood = _fill(admission, "flood")
    assert len(flood) == 13  # stops at 14 in flight, under the limit: 2 slots stay free
    with pytest.raises(RateLimited, match=r"tenant 'flood' has 13 of them, at or over its share of 7\.0 of 14 \(the slots less 2 kept free"):
        admission.admit(M, 0.0, tenant="flood")
    steady += _fill(admission, "steady", 0.0, most=2)
    assert len(steady) == 3 and admission.stats(M).in_flight == 16  # both found one
    for ticket in steady:
        ticket.release(1.0)
    assert len(_fill(admission, "flood", 2.0)) == 1  # to the 14 again: within the grace the steady tenant is not gone
    assert len(_fill(admission, "flood", 6.5)) == 24 - 14  # past it: the whole limit
    # Two floods: neither is under its share, so nothing is kept back.
    floods = _admission(headroom=0.125, idle_grace_s=5.0)
    _fill(floods, "x", most=12)
    _fill(floods, "y")
    assert floods.stats(M).in_flight == 24
    # A one-slot model keeps no headroom: its slot stays usable.
    tiny = Admission(AdmissionConfig(headroom=0.5, initial_queue_factor=0.0))
    tiny.set_capacity(M, 1)
    tiny.admit(M, 0.0, tenant="x")
    tiny.admit(M, 0.0, tenant="y")  # under its share: over the limit of 1


def test_retry_after_is_sane_and_the_refusal_names_the_share() -> None:
    admission = _admission(headroom=0.0, max_retry_after_s=30.0)
    flood = _fill(admission, "flood")
    admission.admit(M, 0.0, tenant="steady")
    for ticket in flood[:4]:
        ticket.release(2.0)  # requests stay in ~2 s
    refusals = []
    for _ in range(8):  # 3 fill the limit again, the rest are refused
        try:
            admission.admit(M, 2.0, tenant="flood")
        except RateLimited as exc:
            refusals.append(exc)
    assert refusals, "the flood, over its share, was let in"
    for exc in refusals:
        assert 1.0 <= exc.retry_after <= 30.0 and exc.retry_after == int(exc.retry_after)
        assert exc.http_status == 429 and f"retry after {int(exc.retry_after)} s" in exc.message
        assert "tenant 'flood'" in exc.message and "share of 12.0" in exc.message
    # Far over its share (capacity lost): the wait grows, capped.
    admission.set_capacity(M, 2)
    with pytest.raises(RateLimited) as far:
        admission.admit(M, 3.0, tenant="flood")
    assert 2.0 <= far.value.retry_after <= 30.0


def test_the_exporter_reads_tenants_and_classes_at_scrape_time() -> None:
    admission = _admission(headroom=0.0)
    _fill(admission, "acme", request_class="interactive", most=3)
    _fill(admission, "bulk", request_class="batch")
    registry = CollectorRegistry()
    registry.register(AdmissionCollector(admission))
    value = registry.get_sample_value
    assert value("tierflow_router_admission_tenant_admitted_total", {"model": M, "tenant": "acme", "class": "interactive"}) == 3
    assert value("tierflow_router_admission_tenant_in_flight", {"model": M, "tenant": "bulk", "class": "batch"}) == 21
    assert value("tierflow_router_admission_tenant_refused_total", {"model": M, "tenant": "bulk", "class": "batch"}) == 1
    assert value("tierflow_router_admission_class_in_flight", {"model": M, "class": "interactive"}) == 3
    assert value("tierflow_router_admission_class_in_flight", {"model": M, "class": "standard"}) == 0
    assert value("tierflow_router_admission_refused_total", {"model": M}) == 1


# ------------------------------------------------------------------------ properties
class FairMachine(RuleBasedStateMachine):
    """Random tenants, classes, weights, releases, capacity and time: the books add up, a
    flow with nothing in flight is never refused, and a lone flow never passes the limit."""

    TENANTS = ("a", "b", "c")

    def __init__(self) -> None:
        super().__init__()
        self.admission = Admission(AdmissionConfig(idle_grace_s=2.0))
        self.admission.set_capacity(M, 8)
        self.now = 0.0
        self.live: list[Ticket] = []
        self.admitted = 0

    @rule(dt=st.floats(0.0, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(tenant=st.sampled_from(TENANTS), request_class=st.sampled_from(CLASSES), weight=st.sampled_from([0.5, 1.0, 3.0]))
    def admit(self, tenant: str, request_class: str, weight: float) -> None:
        holding = _flow(self.admission, tenant, request_class)
        alone = not any(t.tenant != tenant or t.request_class != request_class for t in self.live)
        try:
            ticket = self.admission.admit(M, self.now, tenant=tenant, weight=weight, request_class=request_class)
        except RateLimited as exc:
            assert holding > 0, "a flow with nothing in flight was refused"
            assert 1.0 <= exc.retry_after <= self.admission.config.max_retry_after_s
            return
        self.live.append(ticket)
        self.admitted += 1
        stats = self.admission.stats(M)
        if alone and stats.limit is not None:
            assert stats.in_flight <= stats.limit

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.live:
            ticket = data.draw(st.sampled_from(self.live))
            assert ticket.release(self.now)
            self.live.remove(ticket)

    @rule(slots=st.integers(0, 20))
    def capacity(self, slots: int) -> None:
        self.admission.set_capacity(M, slots)

    @invariant()
    def books_balance(self) -> None:
        stats = self.admission.stats(M)
        flows = [f for f in self.admission.flows() if f.model == M]
        assert stats.in_flight == len(self.live) == sum(f.in_flight for f in flows) == sum(stats.in_flight_by_class.values())
        assert stats.admitted == self.admitted == sum(f.admitted for f in flows)
        assert stats.refused == sum(f.refused for f in flows)


TestFairMachine = FairMachine.TestCase
TestFairMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
