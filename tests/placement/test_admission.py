"""Admission before queueing: limits, tickets, and a virtual-time queue at 3x capacity.

The properties drive `Admission` through random sequences of admits, releases, starts,
capacity changes and router counts; the simulation runs a fixed pool of batch slots with
a FIFO queue in virtual time, with and without admission in front of it.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tierflow.contracts import messages
from tierflow.placement import NodeView
from tierflow.placement.admission import Admission, AdmissionConfig, Ticket, capacity_of
from tierflow.runtime.errors import RateLimited

M = "llama"


def _fill(admission: Admission, n: int, now: float = 0.0) -> list[Ticket]:
    return [admission.admit(M, now) for _ in range(n)]


# ------------------------------------------------------------------------ basic rules
def test_without_known_capacity_everything_is_admitted() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0))
    tickets = _fill(admission, 5000)
    stats = admission.stats(M)
    assert stats.limit is None and stats.in_flight == 5000 and stats.refused == 0
    admission.set_capacity(M, 8)  # a node appears: the requests already in count against it
    with pytest.raises(RateLimited):
        admission.admit(M, 1.0)
    for ticket in tickets:
        ticket.release(2.0)
    assert admission.stats(M).in_flight == 0


def test_the_batch_slots_are_never_refused_and_the_excess_is_at_once() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0, queue_budget_s=2.0))
    admission.set_capacity(M, 8)
    tickets = _fill(admission, 8)  # the floor: all of this router's slots
    with pytest.raises(RateLimited) as refused:
        admission.admit(M, 0.0)
    exc = refused.value
    assert exc.http_status == 429 and exc.code == "overloaded"
    assert exc.retry_after >= 1.0
    assert exc.message == f"model {M!r} is at capacity: 8 requests in flight for 8 batch slots; retry after 1 s"
    tickets[0].release(1.0)
    admission.admit(M, 1.0)  # the freed slot is taken at once
    stats = admission.stats(M)
    assert (stats.capacity, stats.slots, stats.limit, stats.ceiling) == (8, 8, 8, 16)
    assert (stats.in_flight, stats.admitted, stats.refused) == (8, 9, 1)


def test_before_any_queue_time_a_model_admits_a_queue_of_half_its_slots() -> None:
    """The default start: Poisson bursts at capacity fit (a floor-only start refused ~10%
    of them), and AIMD cuts from there once queue times say so."""
    admission = Admission()
    admission.set_capacity(M, 8)
    tickets = _fill(admission, 12)
    with pytest.raises(RateLimited):
        admission.admit(M, 0.0)
    tickets[0].started(5.0, 1.0)  # queue times over the budget: the allowance shrinks
    assert admission.stats(M).limit < 12
    for ticket in tickets:
        ticket.release(2.0)


def test_release_is_idempotent() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0))
    admission.set_capacity(M, 2)
    a, b = _fill(admission, 2)
    assert a.release(1.0) is True
    assert a.release(1.0) is False and a.release(5.0) is False
    assert a.released and admission.stats(M).in_flight == 1
    a.started(10.0, 2.0)  # a late start report on a released ticket changes nothing
    assert admission.stats(M).cuts == 0
    admission.admit(M, 2.0)
    with pytest.raises(RateLimited):
        admission.admit(M, 2.0)  # the double release did not free a second slot
    b.release(3.0)


def test_routers_share_the_slots() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0), routers=3)
    admission.set_capacity(M, 10)
    assert admission.stats(M).slots == 4  # ceil(10 / 3): a free slot is never refused
    _fill(admission, 4)
    with pytest.raises(RateLimited, match=r"4 requests in flight for 4 batch slots \(this router's share of 10\)"):
        admission.admit(M, 0.0)
    admission.share(1)
    assert admission.stats(M).slots == 10
    with pytest.raises(ValueError, match="at least 1"):
        admission.share(0)


def test_slow_starts_cut_the_queue_once_per_budget_period_never_below_the_slots() -> None:
    config = AdmissionConfig(initial_queue_factor=0.0, queue_budget_s=1.0, max_queue_factor=1.0)
    admission = Admission(config)
    admission.set_capacity(M, 10)
    tickets = _fill(admission, 10)
    # Grow the queue allowance to the ceiling: fast starts while the limit is in use.
    now = 0.0
    while admission.stats(M).limit != 20:
        now += 0.01
        try:
            tickets.append(admission.admit(M, now))
        except RateLimited:
            pass
        tickets[-1].started(0.0, now)
    cuts = []
    for i in range(50):  # starts 20 ms apart, each over the budget
        tickets[i % len(tickets)].started(5.0, now + i * 0.02)
        cuts.append(admission.stats(M).limit)
    assert cuts[0] == 15  # one cut: half the queue allowance of 10
    assert set(cuts) == {15}  # and no second one within the same second
    for k in range(1, 20):
        tickets[0].started(5.0, now + k * 1.0)
    stats = admission.stats(M)
    assert stats.limit == 10 and stats.cuts >= 2  # at the floor, and it stays there


def test_fast_starts_grow_the_limit_only_while_it_is_in_use() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0, queue_budget_s=1.0, max_queue_factor=0.5))
    admission.set_capacity(M, 10)
    ticket = admission.admit(M, 0.0)
    for i in range(1000):  # quiet: one request in flight, fast starts
        ticket.started(0.0, i * 0.01)
    assert admission.stats(M).limit == 10
    tickets = _fill(admission, 9)
    for i in range(1000):  # busy: every slot the limit allows is taken, the rest refused
        now = 10 + i * 0.01
        with pytest.raises(RateLimited):
            while True:
                tickets.append(admission.admit(M, now))
        tickets[i % 9].started(0.0, now)
    assert admission.stats(M).limit == 15  # the ceiling: 10 * (1 + 0.5)


def test_a_start_within_the_band_changes_nothing() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0, queue_budget_s=1.0, fast_fraction=0.5))
    admission.set_capacity(M, 4)
    tickets = _fill(admission, 4)
    with pytest.raises(RateLimited):
        admission.admit(M, 0.0)
    for i in range(100):
        tickets[0].started(0.75, i * 0.1)  # between half the budget and the budget
    assert admission.stats(M).limit == 4 and admission.stats(M).cuts == 0


def test_the_learned_queue_scales_with_the_fleet() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0, queue_budget_s=1.0, max_queue_factor=1.0))
    admission.set_capacity(M, 10)
    admission._models[M].q = 0.5  # as if learned
    admission._models[M]._relimit()
    assert admission.stats(M).limit == 15
    admission.set_capacity(M, 20)
    assert admission.stats(M).limit == 30
    admission.set_capacities({})  # every node gone: no limit, placement will say why
    assert admission.stats(M).limit is None


def test_retry_after_grows_when_far_over_a_lost_capacity() -> None:
    admission = Admission(AdmissionConfig(initial_queue_factor=0.0, queue_budget_s=1.0, max_retry_after_s=30.0))
    admission.set_capacity(M, 100)
    tickets = _fill(admission, 100)
    for t in tickets[:50]:
        t.release(20.0)  # requests stay 20 s
    tickets = tickets[50:] + _fill(admission, 50, 20.0)
    admission.set_capacity(M, 10)  # 90 nodes' worth of slots gone at once
    with pytest.raises(RateLimited) as refused:
        admission.admit(M, 21.0)
    # 91 requests to get through a limit of 10 at one every 2 s: capped at 30 s.
    assert refused.value.retry_after == 30.0
    assert "100 requests in flight for 10 batch slots; retry after 30 s" in refused.value.message


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="routers"):
        Admission(routers=0)
    with pytest.raises(ValueError, match="negative"):
        Admission(AdmissionConfig(initial_queue_factor=0.0)).set_capacity(M, -1)


def test_capacity_of_counts_the_slots_of_nodes_that_take_work() -> None:
    def view(node: str, models: list[messages.ModelState], *, seen: float = 100.0, cordoned: bool = False) -> NodeView:
        hb = messages.NodeHeartbeat(node_id=node, models=models, max_batch=16, cordoned=cordoned, interval_s=1.0)
        return NodeView.from_heartbeat(hb, seen)

    views = [
        view("a", [messages.ModelState(name=M, version="v1", max_batch=8), messages.ModelState(name="x", max_batch=4)]),
        view("b", [messages.ModelState(name=M, version="v1", max_batch=8), messages.ModelState(name=M, version="v2", max_batch=4)]),
        view("c", [messages.ModelState(name=M)]),  # no per-model limit reported: the node's 16
        view("d", [messages.ModelState(name=M, max_batch=8)], cordoned=True),
        view("e", [messages.ModelState(name=M, max_batch=8)], seen=50.0),  # silent for 50 s
    ]
    assert capacity_of(views, 100.5) == {M: 8 + 8 + 4 + 16, "x": 4}


# ------------------------------------------------------------------------ properties
class AdmissionMachine(RuleBasedStateMachine):
    """Random traffic against one model; the bookkeeping must always add up."""

    def __init__(self) -> None:
        super().__init__()
        self.admission = Admission(AdmissionConfig(queue_budget_s=0.5, max_queue_factor=1.5))
        self.now = 0.0
        self.live: list[Ticket] = []
        self.done: list[Ticket] = []

    def _check_bounds(self) -> None:
        stats = self.admission.stats(M)
        if stats.capacity:
            assert stats.limit is not None and stats.slots <= stats.limit <= stats.ceiling
            assert stats.slots == max(1, math.ceil(stats.capacity / self.admission.routers))
            assert stats.ceiling <= max(stats.slots, math.floor(stats.capacity / self.admission.routers * 2.5))
        else:
            assert stats.limit is None

    @rule(dt=st.floats(0.0, 2.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def admit(self) -> None:
        before = self.admission.stats(M)
        try:
            ticket = self.admission.admit(M, self.now)
        except RateLimited as exc:
            assert before.limit is not None and before.in_flight >= before.limit >= before.slots
            assert 1.0 <= exc.retry_after <= self.admission.config.max_retry_after_s
            return
        self.live.append(ticket)
        after = self.admission.stats(M)
        assert after.limit is None or after.in_flight <= after.limit

    @rule(data=st.data(), queue_time=st.sampled_from([0.0, 0.1, 0.3, 0.49, 0.5, 0.6, 2.0, 30.0]))
    def start(self, data: st.DataObject, queue_time: float) -> None:
        if self.live:
            ticket = data.draw(st.sampled_from(self.live))
            ticket.started(queue_time, self.now)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.live:
            ticket = data.draw(st.sampled_from(self.live))
            assert ticket.release(self.now) is True
            self.live.remove(ticket)
            self.done.append(ticket)

    @rule(data=st.data())
    def release_again(self, data: st.DataObject) -> None:
        if self.done:
            assert data.draw(st.sampled_from(self.done)).release(self.now) is False

    @rule(slots=st.integers(0, 40))
    def capacity(self, slots: int) -> None:
        self.admission.set_capacity(M, slots)

    @rule(routers=st.integers(1, 4))
    def routers(self, routers: int) -> None:
        self.admission.share(routers)

    @invariant()
    def books_balance(self) -> None:
        stats = self.admission.stats(M)
        assert stats.in_flight == len(self.live)
        assert stats.admitted == len(self.live) + len(self.done)
        self._check_bounds()


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# ------------------------------------------------------------------- virtual-time queue
@dataclass
class Run:
    """What one simulated run measured."""

    duration: float
    capacity_rps: float
    arrived: int = 0
    completed: int = 0
    refused: int = 0
    retry_after: list[float] = field(default_factory=list)
    queue_times: list[tuple[float, float]] = field(default_factory=list)  # (started at, queued for)

    @property
    def goodput(self) -> float:
        return self.completed / self.duration

    def p95(self) -> float:
        waits = sorted(q for _, q in self.queue_times)
        return waits[int(0.95 * len(waits))]

    def mean_wait_between(self, start: float, end: float) -> float:
        return statistics.mean(q for t, q in self.queue_times if start <= t < end)


def simulate(load: float, *, admission: Admission | None, slots: int = 16, service_s: float = 2.0,
             duration: float = 300.0, seed: int = 7) -> Run:
    """Poisson arrivals at `load` times what `slots` batch slots of `service_s` each can
    serve, into a FIFO queue in front of them; admission (when given) decides at arrival.
    Counts what completes within `duration`."""
    rng = random.Random(seed)
    rate = load * slots / service_s
    run = Run(duration, slots / service_s)
    events: list[tuple[float, int, Ticket | None]] = [(rng.expovariate(rate), 0, None)]  # ticket None: an arrival
    seq, free = 1, slots
    queue: deque[tuple[float, Ticket | None]] = deque()
    gate = admission if admission is not None else Admission()  # no capacity set: admits everything
    while events:
        now, _, ticket = heapq.heappop(events)
        if ticket is None:  # an arrival
            if now >= duration:
                continue
            heapq.heappush(events, (now + rng.expovariate(rate), seq, None))
            seq += 1
            run.arrived += 1
            try:
                admitted = gate.admit(M, now)
            except RateLimited as exc:  # answered at the arrival instant, nothing waited
                run.refused += 1
                run.retry_after.append(exc.retry_after)
                continue
            if free:
                free -= 1
                admitted.started(0.0, now)
                run.queue_times.append((now, 0.0))
                heapq.heappush(events, (now + service_s, seq, admitted))
                seq += 1
            else:
                queue.append((now, admitted))
        else:  # a completion
            ticket.release(now)
            if now <= duration:
                run.completed += 1
            if queue:
                arrived_at, waiting = queue.popleft()
                assert waiting is not None
                waiting.started(now - arrived_at, now)
                run.queue_times.append((now, now - arrived_at))
                heapq.heappush(events, (now + service_s, seq, waiting))
                seq += 1
            else:
                free += 1
    return run


def _admission(budget: float, slots: int = 16) -> Admission:
    admission = Admission(AdmissionConfig(queue_budget_s=budget))
    admission.set_capacity(M, slots)
    return admission


@pytest.mark.parametrize(("slots", "service_s", "budget"), [(16, 2.0, 1.0), (8, 1.0, 0.5), (64, 1.0, 0.25)])
def test_at_3x_capacity_admitted_requests_keep_their_budget_and_goodput_holds(slots: int, service_s: float, budget: float) -> None:
    at_capacity = simulate(1.0, admission=_admission(budget, slots), slots=slots, service_s=service_s)
    overloaded = simulate(3.0, admission=_admission(budget, slots), slots=slots, service_s=service_s)
    assert overloaded.p95() <= budget
    assert overloaded.goodput >= 0.97 * overloaded.capacity_rps
    assert overloaded.goodput >= at_capacity.goodput
    # The excess (about two thirds) is refused at the door, each with a usable Retry-After.
    assert 0.6 <= overloaded.refused / overloaded.arrived <= 0.7
    assert all(1.0 <= r <= 30.0 for r in overloaded.retry_after)


def test_without_admission_the_queue_grows_without_bound() -> None:
    run = simulate(3.0, admission=None, duration=120.0)
    assert run.refused == 0
    assert run.p95() > 50 * 1.0
    early, late = run.mean_wait_between(10, 20), run.mean_wait_between(100, 110)
    assert late > early + 50  # still climbing: two thirds of every second's arrivals pile up
    assert run.goodput <= run.capacity_rps  # and all that waiting bought no throughput
