"""Admission: how many of a model's requests this router lets in at once, and whose.

Without it the router sends everything on and the nodes queue it (up to 1,024 each), so
at 3x capacity every request waits minutes and the first refusal comes only when every
queue is full. With it, a request over the limit is refused at the door in microseconds
with a Retry-After, and the ones let in start within the queue-time budget.

Per model, the limit on this router's requests in flight (admitted, not yet released) is

    floor    = ceil(capacity / routers)     this router's share of the batch slots
    limit    = share * (1 + q)              q: the queue allowed above the slots, learned
    ceiling  = share * (1 + max_queue_factor)

where capacity is the sum of the model's batch slots over the live nodes serving it (from
their heartbeats, `capacity_of`). The limit never drops below the floor (a request that
would find a free batch slot is never refused) nor rises above the ceiling. `q` is set by
AIMD on the queue times the nodes report when a request starts (`Started.queue_time`):

* a queue time over the budget cuts q by `decrease` (at most once per budget period:
  the starts that follow a cut still queued behind the requests admitted before it);
* a queue time under `fast_fraction` of the budget, while the limit is in use (a request
  was refused or the limit reached since it last changed), adds `increase` slots per
  limit's worth of such starts (TCP's one segment per round trip);
* in between, nothing changes: that band is where the limit settles.

A model with no known capacity (no live node has reported it) admits everything:
placement answers 503 for it with a better reason than a limit could.

Whose requests (issue 21): the limit is shared by request class and tenant weight, so a
tenant flooding a model cannot take it from a steady tenant beside it. Requests of one
tenant in one class are a *flow*; a flow is active while it has requests in flight and
for `idle_grace_s` after its last one left (a client between two calls is not gone).

* Under the limit every request is admitted (nothing is held back from idle capacity),
  except into the headroom (below).
* At the limit a request is admitted only if its flow is under its share:

      entitled(class) = max(pool - in flight of the classes above it, pool * class_floor)
      share(flow)     = entitled(class) * weight / (active weights of its class)

  where the pool is the limit. Classes are in strict priority: an interactive request's
  entitlement ignores what batch requests hold, so it takes the slot a batch request
  would have taken next, and batch is refused until the interactive work no longer needs
  the limit; `class_floor` keeps a trickle for a starved class. Within a class each
  active tenant gets its weighted part. A flow over its share is refused (429,
  Retry-After, the message names its share); a flow under it is admitted even though
  that takes the model over its limit, by at most the under-share flows' entitlement:
  the flood, over its share, is refused and drains back under the limit, while the
  steady tenant is never locked out. A flow with nothing in flight is always under its
  share, so every tenant of every class keeps at least one request going.
* Headroom: while another flow may need it (one active in a class above, or one of the
  same class under its share), the pool is the batch slots less `headroom` of them, and
  a flow over its share of that pool is refused from there on, even under the limit. So
  the steady tenant's next request finds a free batch slot instead of waiting for one to
  empty behind the flood; when every active flow has its share (two floods), nothing is
  kept back.

Why this and not the alternatives the issue names (`loadtest/fair_admission.py`, figures
in its docstring: a steady tenant beside a flood of 24x its concurrency on 16 slots):
sharing the limit alone keeps the steady tenant admitted, but its requests still wait for
a slot to empty (TTFT p95 20-50x its value alone); a bounded router-side wait queue
changed nothing unless the node queue was also taken away, and then only matched what
node-side fair queuing gives (20x); a reserve for higher classes the same. Only keeping
a little headroom free for flows under their share, and counting a flow as active
between its calls, brought the steady tenant's p95 to its value alone (1.0x, goodput
0.99) there, and in the simulator (open-loop arrivals, 2 nodes of 8 slots, the flood at
36 calls/s: 20 ms against 19 ms alone; 623 ms sharing the limit alone, 70 s without
admission), with an eighth of the slots kept. At 24x the steady tenant's rate
(`loadtest/tenant_flood.py --sim`) an eighth left its p95 at 1.55x, a quarter (the
default) 1.18x. The cost is the flood's: the headroom's slots and its node queue while it
shares the model (with a quarter, 47% of the flood's calls refused there, where a refused
call is not retried). No wait queue, then: no held requests, no timers.

Usage (`now` is the caller's monotonic clock; nothing here reads a clock):

    ticket = admission.admit(model, now, tenant=name, weight=w, request_class=c)  # or RateLimited
    try:
        ...                                     # on `Started`: ticket.started(queue_time, now)
    finally:
        ticket.release(now)                     # idempotent: safe on every exit path

Several routers split the fleet like tenant limits do (`TenantDirectory.share`): each
knows its peers and keeps 1/N (`share(routers)`). Per-request cost: a few dict lookups
and counters (issue 16); the per-tenant counters are read by the metrics exporter at
scrape time (`flows()`), never written to Prometheus per request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
from msgspec import Meta

from tierflow.placement.classes import CLASS_RANK, CLASSES
from tierflow.placement.view import NodeView
from tierflow.runtime.errors import RateLimited

__all__ = ["AdmissionConfig", "Admission", "AdmissionStats", "FlowStats", "Ticket", "capacity_of"]


class AdmissionConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Admission settings (the router's; every field has a working default)."""

    queue_budget_s: Annotated[float, Meta(gt=0.0)] = 1.0
    """How long an admitted request may wait in a node's queue before it starts: the TTFT
    SLO minus the prompt's own prefill time, roughly."""
    max_queue_factor: Annotated[float, Meta(ge=0.0)] = 1.0
    """The most queue allowed above the batch slots, as a fraction of them (the ceiling)."""
    initial_queue_factor: Annotated[float, Meta(ge=0.0)] = 0.5
    """The queue allowed before any queue time was seen (capped at `max_queue_factor`).
    Starting at no queue refused ~10% of calls at capacity (Poisson bursts over the slots,
    fault suite finding F4) before AIMD could grow it; starting higher costs at most one
    budget period of longer queues before the first cut."""
    decrease: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.5
    """The fraction of the queue allowance kept when queue times exceed the budget."""
    increase: Annotated[float, Meta(gt=0.0)] = 1.0
    """Slots added per limit's worth of fast starts while the limit is in use."""
    fast_fraction: Annotated[float, Meta(gt=0.0, lt=1.0)] = 0.5
    """Queue times under this fraction of the budget count as fast (room to grow)."""
    max_retry_after_s: Annotated[float, Meta(ge=1.0)] = 30.0
    """The longest Retry-After a refusal suggests."""
    hold_smoothing: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.1
    """Weight of the newest sample in the moving average of how long requests stay in."""
    class_floor: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.05
    """The fraction of the limit a class is entitled to whatever the classes above it hold:
    starvation protection under strict priority (0: none, a batch class may wait forever)."""
    headroom: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.25
    """The fraction of the batch slots kept free for flows under their share while flows
    share the model: a flow at or over its share is admitted only below the slots less
    this headroom, so a steady tenant's next request finds a free slot instead of waiting
    for one to empty. Costs the flood that much throughput while it shares (0: no headroom).
    A quarter, measured (`loadtest/tenant_flood.py --sim`: 2 nodes of 8 slots, a steady
    tenant at 10 calls/s beside a 24x flood): an eighth kept its TTFT p95 at 1.55x its value
    alone, since the free slots are spread over the nodes and the steady tenant's own
    bursts need more than one; a quarter 1.17x, at 12% fewer flood calls than an eighth."""
    idle_grace_s: Annotated[float, Meta(ge=0.0)] = 5.0
    """How long a flow still counts as active (for shares and headroom) after its last
    request left: a closed-loop client thinking between calls is not gone."""


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """One model's admission state, as a metrics exporter or status page wants it."""

    model: str
    capacity: int  # batch slots over the fleet's live nodes (0: unknown)
    slots: int  # this router's share of them: the floor of the limit
    limit: int | None  # None: no capacity known, everything is admitted
    ceiling: int
    in_flight: int
    admitted: int  # totals since this router started
    refused: int
    cuts: int  # times queue times over the budget cut the limit
    in_flight_by_class: dict[str, int] = field(default_factory=dict)  # every class, 0 included


@dataclass(frozen=True, slots=True)
class FlowStats:
    """One tenant's requests of one class for one model (a flow), for the metrics."""

    model: str
    tenant: str
    request_class: str
    weight: float
    in_flight: int
    admitted: int  # totals since this router started
    refused: int


class _Flow:
    """One tenant's requests of one class for one model. Kept once made (tenants are
    configured, so there are few), so its totals survive its idle spells."""

    __slots__ = ("tenant", "weight", "in_flight", "idle_since", "admitted", "refused")

    def __init__(self, tenant: str, weight: float) -> None:
        self.tenant = tenant
        self.weight = weight
        self.in_flight = 0
        self.idle_since = -math.inf  # when its last request left
        self.admitted = 0
        self.refused = 0


class _Class:
    """One request class of one model: its flows, and those active lately (in flight, or
    idle for less than the grace), which only the at-the-limit path reads and prunes."""

    __slots__ = ("name", "in_flight", "flows", "active")

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.flows: dict[str, _Flow] = {}
        self.active: dict[str, _Flow] = {}  # a superset of the active flows: pruned when read


class _Model:
    """The counters and the learned queue allowance of one model."""

    __slots__ = ("name", "capacity", "share", "floor", "ceiling", "limit", "q", "in_flight", "headroom", "low_water",
                 "saturated", "last_cut", "hold_s", "admitted", "refused", "cuts", "classes")

    def __init__(self, name: str, q: float = 0.0) -> None:
        self.name = name
        self.capacity = 0
        self.share = 0.0
        self.floor = 0
        self.ceiling = 0
        self.limit = 0  # 0 while capacity is unknown: no limit
        self.headroom = 0  # batch slots kept for flows under their share (AdmissionConfig.headroom)
        self.low_water = 0  # from here on shares are checked: the limit, or the slots less the headroom
        self.q = q
        self.in_flight = 0
        self.saturated = False
        self.last_cut = -math.inf
        self.hold_s: float | None = None
        self.admitted = 0
        self.refused = 0
        self.cuts = 0
        self.classes = tuple(_Class(name) for name in CLASSES)  # by CLASS_RANK

    def resize(self, capacity: int, routers: int, config: AdmissionConfig) -> None:
        self.capacity = capacity
        if capacity <= 0:
            self.share, self.floor, self.ceiling, self.limit, self.low_water = 0.0, 0, 0, 0, 0
            return
        self.share = capacity / routers
        self.floor = max(1, math.ceil(self.share))
        self.ceiling = max(self.floor, math.floor(self.share * (1.0 + config.max_queue_factor)))
        self.headroom = min(self.floor - 1, math.ceil(config.headroom * self.floor - 1e-9))  # a slot always stays usable
        self._relimit()

    def _relimit(self) -> None:
        self.limit = min(self.ceiling, max(self.floor, math.floor(self.share * (1.0 + self.q) + 1e-9)))
        self.low_water = min(self.limit, self.floor - self.headroom) if self.headroom else self.limit


class Ticket:
    """One admitted request's hold on its model's limit. `release` frees it exactly once,
    however many exit paths call it; `started` feeds the node's queue time back."""

    __slots__ = ("model", "admitted_at", "_state", "_cls", "_flow", "_owner", "_released")

    def __init__(self, owner: Admission, state: _Model, cls: _Class, flow: _Flow, now: float) -> None:
        self.model = state.name
        self.admitted_at = now
        self._owner = owner
        self._state = state
        self._cls = cls
        self._flow = flow
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @property
    def tenant(self) -> str:
        return self._flow.tenant

    @property
    def request_class(self) -> str:
        return self._cls.name

    def started(self, queue_time: float, now: float) -> None:
        """The node started the request after `queue_time` seconds in its queue
        (`Started.queue_time`); a retry on another node reports its own start."""
        if not self._released:
            self._owner._observe(self._state, queue_time, now)

    def release(self, now: float) -> bool:
        """The request is over (finished, failed, refused by a node, or the client left).
        True the first time, False after: a double release frees nothing."""
        if self._released:
            return False
        self._released = True
        self._owner._release(self._state, self._cls, self._flow, now - self.admitted_at, now)
        return True

    def __repr__(self) -> str:
        return f"Ticket({self.model!r}, {self.tenant!r}, {self.request_class!r}, admitted_at={self.admitted_at}, released={self._released})"


class Admission:
    """Per-model admission limits for one router process, shared by class and tenant
    weight. Pure: `now` is passed in."""

    __slots__ = ("config", "routers", "_models")

    def __init__(self, config: AdmissionConfig | None = None, *, routers: int = 1) -> None:
        if routers < 1:
            raise ValueError(f"routers must be at least 1, got {routers}")
        self.config = config or AdmissionConfig()
        self.routers = routers
        self._models: dict[str, _Model] = {}

    def _model(self, model: str) -> _Model:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _Model(model, min(self.config.initial_queue_factor, self.config.max_queue_factor))
        return state

    # -------------------------------------------------------------- what the fleet offers
    def set_capacity(self, model: str, slots: int) -> None:
        """The model's batch slots over the live nodes serving it (0: none known). The
        learned queue allowance is kept as a fraction, so the limit scales with the fleet."""
        if slots < 0:
            raise ValueError(f"slots must not be negative, got {slots}")
        state = self._model(model)
        if slots != state.capacity:
            state.resize(slots, self.routers, self.config)

    def set_capacities(self, slots_by_model: dict[str, int]) -> None:
        """`set_capacity` for every model at once; models missing from the map have none."""
        for name, state in self._models.items():
            if name not in slots_by_model and state.capacity:
                state.resize(0, self.routers, self.config)
        for name, slots in slots_by_model.items():
            self.set_capacity(name, slots)

    def share(self, routers: int) -> None:
        """`routers` routers share the fleet: keep 1/N of every model's slots and queue."""
        if routers < 1:
            raise ValueError(f"routers must be at least 1, got {routers}")
        if routers != self.routers:
            self.routers = routers
            for state in self._models.values():
                state.resize(state.capacity, routers, self.config)

    # ---------------------------------------------------------------- per request
    def admit(self, model: str, now: float, *, tenant: str = "", weight: float = 1.0, request_class: str = "standard") -> Ticket:
        """A `Ticket` if the model has room, or the tenant is under its share of it in its
        class (see the module docstring); else `RateLimited` (429) with a Retry-After and a
        message naming the model, its load, the tenant's share and when to come back. Call
        it once the model name is resolved (each name asked about keeps a small record).
        `request_class`: a name of `tierflow.placement.classes.CLASSES` (KeyError else)."""
        state = self._model(model)
        cls = state.classes[CLASS_RANK[request_class]]
        flow = cls.flows.get(tenant)
        if flow is None:
            flow = cls.flows[tenant] = _Flow(tenant, weight)
        flow.weight = weight  # the tenant's configuration may have changed
        limit = state.limit
        if limit and state.in_flight >= state.low_water:  # the only path that looks at other flows
            pool, weights = self._pool(state, cls, flow, now)
            if pool < limit or state.in_flight >= limit:  # else: the headroom, which no one else needs now
                share = self._entitled(state, cls, pool) * weight / weights
                if flow.in_flight >= share:
                    raise self._refuse(state, cls, flow, share, weights, pool)
        if not flow.in_flight:
            cls.active[tenant] = flow
        flow.in_flight += 1
        flow.admitted += 1
        cls.in_flight += 1
        state.in_flight += 1
        state.admitted += 1
        if limit and state.in_flight >= limit:
            state.saturated = True
        return Ticket(self, state, cls, flow, now)

    def _pool(self, state: _Model, cls: _Class, flow: _Flow, now: float) -> tuple[int, float]:
        """What the flows of the class share, and the weights of its active ones (this
        flow's included). The pool is the limit, or the slots less the headroom while
        another flow may need that headroom: one active in a class above, or one of this
        class under its share. Prunes the flows idle past the grace on the way:
        O(active flows of the class and those above), paid only by requests at the limit
        (or in the headroom)."""
        grace = self.config.idle_grace_s
        weights = flow.weight
        above = False
        for each in state.classes:
            active = each.active
            idle: list[str] | None = None
            for tenant, other in active.items():
                if other is flow:
                    continue
                if other.in_flight or now - other.idle_since < grace:
                    if each is cls:
                        weights += other.weight
                    else:
                        above = True
                else:
                    idle = [tenant] if idle is None else [*idle, tenant]
            if idle is not None:
                for tenant in idle:  # idle past the grace: no longer shares
                    del active[tenant]
            if each is cls:
                break
        low = state.low_water
        if low < state.limit and not above:
            entitled = self._entitled(state, cls, low)
            for other in cls.active.values():
                if other is not flow and other.in_flight * weights < entitled * other.weight:
                    return low, weights  # one under its share: keep the headroom for it
            return state.limit, weights  # every other flow has its share: no headroom to keep
        return low, weights

    def _entitled(self, state: _Model, cls: _Class, pool: int) -> float:
        """What the class may hold of `pool` (the limit, or the slots less the headroom
        while flows share): all of it less what the classes above hold (strict priority),
        never under `class_floor` of it (starvation protection)."""
        above = 0
        for higher in state.classes:
            if higher is cls:
                break
            above += higher.in_flight
        return max(pool - above, pool * self.config.class_floor)

    def _refuse(self, state: _Model, cls: _Class, flow: _Flow, share: float, weights: float, pool: int) -> RateLimited:
        state.saturated = True
        state.refused += 1
        flow.refused += 1
        wait = self._retry_after(state, flow, share)
        whole = share >= state.limit - 1e-9  # alone at the top: its share is the whole limit
        message = f"model {state.name!r} is at capacity: {state.in_flight} requests in flight for {state.floor} batch slots{self._share_note(state)}"
        if flow.tenant and not whole:
            of = f"the limit of {pool}" if pool >= state.limit else f"{pool} (the slots less {state.headroom} kept free for tenants under their share)"
            message += (
                f"; tenant {flow.tenant!r} has {flow.in_flight} of them, at or over its share of {share:.1f} of "
                f"{of} (weight {flow.weight:g} of {weights:g} active in the {cls.name} class)"
            )
        return RateLimited(f"{message}; retry after {wait} s", retry_after=float(wait), code="overloaded" if whole else "fair_share_exceeded")

    def _share_note(self, state: _Model) -> str:
        return f" (this router's share of {state.capacity})" if self.routers > 1 else ""

    def _retry_after(self, state: _Model, flow: _Flow, share: float) -> int:
        """Whole seconds until, at the rate requests have been leaving (the limit's worth
        per hold time), enough have left for this one to get in: the model's excess over
        its limit, or the flow's over its share at the flow's part of that rate, whichever
        comes first. Usually 1; longer when requests are long and the router is far over
        its limit (e.g. just after capacity was lost)."""
        hold = state.hold_s if state.hold_s is not None else self.config.queue_budget_s
        limit = max(1, state.limit)  # requests leave at `limit` per `hold` seconds
        model_wait = hold * (state.in_flight - state.limit + 1) / limit
        flow_wait = hold * (flow.in_flight - math.ceil(share) + 1) * state.in_flight / (limit * flow.in_flight) if flow.in_flight else 0.0
        seconds = math.ceil(min(model_wait, max(0.0, flow_wait)))
        return int(min(self.config.max_retry_after_s, max(1, seconds)))

    def _observe(self, state: _Model, queue_time: float, now: float) -> None:
        config = self.config
        budget = config.queue_budget_s
        if not state.limit:
            return
        if queue_time > budget:
            if now - state.last_cut >= budget and state.q > 0.0:
                state.q *= config.decrease
                if state.q * state.share < 0.5:  # less than half a slot: none
                    state.q = 0.0
                state.last_cut = now
                state.cuts += 1
                state.saturated = False
                state._relimit()
        elif queue_time < budget * config.fast_fraction and state.saturated and state.q < config.max_queue_factor:
            window = state.share * (1.0 + state.q)
            state.q = min(config.max_queue_factor, state.q + config.increase / (window * state.share))
            before = state.limit
            state._relimit()
            if state.limit != before:
                state.saturated = False

    def _release(self, state: _Model, cls: _Class, flow: _Flow, held: float, now: float) -> None:
        state.in_flight -= 1
        cls.in_flight -= 1
        flow.in_flight -= 1
        if not flow.in_flight:
            flow.idle_since = now  # stays in `cls.active` until a share calculation finds it idle
        if held >= 0.0:
            a = self.config.hold_smoothing
            state.hold_s = held if state.hold_s is None else state.hold_s + a * (held - state.hold_s)

    # ---------------------------------------------------------------- what to export
    def stats(self, model: str) -> AdmissionStats:
        state = self._models.get(model) or _Model(model)
        return AdmissionStats(
            model=model,
            capacity=state.capacity,
            slots=state.floor,
            limit=state.limit or None,
            ceiling=state.ceiling,
            in_flight=state.in_flight,
            admitted=state.admitted,
            refused=state.refused,
            cuts=state.cuts,
            in_flight_by_class={cls.name: cls.in_flight for cls in state.classes},
        )

    def snapshot(self) -> list[AdmissionStats]:
        """Every model seen so far (by capacity or by a request), sorted by name."""
        return [self.stats(name) for name in sorted(self._models)]

    def flows(self) -> list[FlowStats]:
        """Every (model, tenant, class) that asked so far, with its totals."""
        return [
            FlowStats(model=name, tenant=flow.tenant, request_class=cls.name, weight=flow.weight, in_flight=flow.in_flight, admitted=flow.admitted, refused=flow.refused)
            for name in sorted(self._models)
            for cls in self._models[name].classes
            for flow in cls.flows.values()
        ]


def capacity_of(views: Iterable[NodeView], now: float) -> dict[str, int]:
    """Batch slots per model over the nodes that take work at `now` (live, not cordoned,
    draining or suspect), every version counted; a model whose own batch limit a node
    does not report counts that node's whole batch."""
    slots: dict[str, int] = {}
    for view in views:
        if not view.takes_work(now):
            continue
        for slot in view.versions.values():
            slots[slot.name] = slots.get(slot.name, 0) + (slot.max_batch or view.max_batch)
    return slots
