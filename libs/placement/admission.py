"""Admission: how many of a model's requests this router lets in at once.

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

Usage (`now` is the caller's monotonic clock; nothing here reads a clock):

    ticket = admission.admit(model, now)        # or RateLimited (429 + Retry-After)
    try:
        ...                                     # on `Started`: ticket.started(queue_time, now)
    finally:
        ticket.release(now)                     # idempotent: safe on every exit path

Several routers split the fleet like tenant limits do (`TenantDirectory.share`): each
knows its peers and keeps 1/N (`share(routers)`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import msgspec
from msgspec import Meta

from tierflow.placement.view import NodeView
from tierflow.runtime.errors import RateLimited

__all__ = ["AdmissionConfig", "Admission", "AdmissionStats", "Ticket", "capacity_of"]


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


class _Model:
    """The counters and the learned queue allowance of one model."""

    __slots__ = ("name", "capacity", "share", "floor", "ceiling", "limit", "q", "in_flight",
                 "saturated", "last_cut", "hold_s", "admitted", "refused", "cuts")

    def __init__(self, name: str, q: float = 0.0) -> None:
        self.name = name
        self.capacity = 0
        self.share = 0.0
        self.floor = 0
        self.ceiling = 0
        self.limit = 0  # 0 while capacity is unknown: no limit
        self.q = q
        self.in_flight = 0
        self.saturated = False
        self.last_cut = -math.inf
        self.hold_s: float | None = None
        self.admitted = 0
        self.refused = 0
        self.cuts = 0

    def resize(self, capacity: int, routers: int, config: AdmissionConfig) -> None:
        self.capacity = capacity
        if capacity <= 0:
            self.share, self.floor, self.ceiling, self.limit = 0.0, 0, 0, 0
            return
        self.share = capacity / routers
        self.floor = max(1, math.ceil(self.share))
        self.ceiling = max(self.floor, math.floor(self.share * (1.0 + config.max_queue_factor)))
        self._relimit()

    def _relimit(self) -> None:
        self.limit = min(self.ceiling, max(self.floor, math.floor(self.share * (1.0 + self.q) + 1e-9)))


class Ticket:
    """One admitted request's hold on its model's limit. `release` frees it exactly once,
    however many exit paths call it; `started` feeds the node's queue time back."""

    __slots__ = ("model", "admitted_at", "_state", "_owner", "_released")

    def __init__(self, owner: Admission, state: _Model, now: float) -> None:
        self.model = state.name
        self.admitted_at = now
        self._owner = owner
        self._state = state
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

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
        self._owner._release(self._state, now - self.admitted_at)
        return True

    def __repr__(self) -> str:
        return f"Ticket({self.model!r}, admitted_at={self.admitted_at}, released={self._released})"


class Admission:
    """Per-model admission limits for one router process. Pure: `now` is passed in."""

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
    def admit(self, model: str, now: float) -> Ticket:
        """A `Ticket` if the model has room; else `RateLimited` (429) with a Retry-After
        and a message naming the model, its load and when to come back. Call it once the
        model name is resolved (each name asked about keeps a small record)."""
        state = self._model(model)
        limit = state.limit
        if limit and state.in_flight >= limit:
            state.saturated = True
            state.refused += 1
            wait = self._retry_after(state)
            raise RateLimited(
                f"model {model!r} is at capacity: {state.in_flight} requests in flight for "
                f"{state.floor} batch slots{self._share_note(state)}; retry after {wait} s",
                retry_after=float(wait),
                code="overloaded",
            )
        state.in_flight += 1
        state.admitted += 1
        if limit and state.in_flight >= limit:
            state.saturated = True
        return Ticket(self, state, now)

    def _share_note(self, state: _Model) -> str:
        return f" (this router's share of {state.capacity})" if self.routers > 1 else ""

    def _retry_after(self, state: _Model) -> int:
        """Whole seconds until, at the rate requests have been leaving, the ones over the
        limit and this one would have got in: usually 1, longer when requests are long
        and the router is far over its limit (e.g. just after capacity was lost)."""
        hold = state.hold_s if state.hold_s is not None else self.config.queue_budget_s
        waiting = state.in_flight - state.limit + 1
        seconds = math.ceil(hold * waiting / max(1, state.limit))
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

    def _release(self, state: _Model, held: float) -> None:
        state.in_flight -= 1
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
        )

    def snapshot(self) -> list[AdmissionStats]:
        """Every model seen so far (by capacity or by a request), sorted by name."""
        return [self.stats(name) for name in sorted(self._models)]


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
