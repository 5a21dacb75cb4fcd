"""Who goes first where a node's queue forms: request classes, then tenants' fair shares.

The engine (`tierflow.rdu.engine`) queues each model's requests per (class, tenant) and
admits them in this order:

1. **Class, strictly**: interactive before standard before batch (the ranks of
   `tierflow.placement.classes`, repeated here so the emulator stays a pure library).
2. **Tenant, by weighted service received** (virtual-time fair queuing, as VTC and llm-d's
   flow control do): within a class, the tenant whose counter is least goes next. A
   tenant's counter grows by the service the node gives it, divided by its weight:
   prompt tokens it prefilled (prefix-cache hits cost the chip nothing, so they count
   nothing) plus tokens it decoded, one per sequence per step. A tenant that becomes
   active (its first waiting request after none waiting or running) starts at the least
   counter among the class's active tenants, so it cannot bank credit while idle; with
   none active, at the highest counter a tenant left with (`FairShares.mark`). Counters
   are per node and per class. A tenant's weight is its latest request's, taken when it
   becomes active: a weight changed mid-burst applies from its next busy period.
3. **FIFO within a tenant** (a preempted request first: it resumes before its class's
   queue moves).

Counters are computed, not accumulated, so both engine modes read the very same floats:
a tenant's decoded tokens are, per model, `steps * sequences - sum(steps at joining)`
where `steps` is that model's decode step count, an integer the engine bumps once per
step (or once per run of steps). Nothing is charged per token, and a counter read at a
decision point does not depend on how the engine batched its steps. A lift (a tenant
becoming active) is applied only when the engine admits a request of that class, a point
both modes share; until then a pick reads the lifted value without storing it.

Starvation protection, "served as if it were in the class above": a class whose oldest
request has waited longer than `starvation_s` goes before the better classes waiting
beside it, as long as that request is also older than the better class's oldest (the
engine's `_serve_class`). A batch request beside an interactive flood therefore starts
within about `starvation_s`, and then its class is served in its tenants' fair order;
a class's own tenants never overtake each other by age, so a flooding tenant's old
requests do not jump ahead of a steady tenant's new ones. Where one class is all there
is, starvation protection changes nothing.
"""

from __future__ import annotations

from typing import Final, Protocol

__all__ = [
    "CLASS_NAMES",
    "CLASS_RANK",
    "N_CLASSES",
    "DEFAULT_STARVATION_S",
    "DEFAULT_CLASS",
    "TenantShare",
    "FairShares",
]

CLASS_NAMES: Final[tuple[str, ...]] = ("interactive", "standard", "batch")
CLASS_RANK: Final[dict[str, int]] = {name: rank for rank, name in enumerate(CLASS_NAMES)}
N_CLASSES: Final = len(CLASS_NAMES)
DEFAULT_CLASS: Final = "standard"
DEFAULT_STARVATION_S: Final = 30.0


class _Stepped(Protocol):
    steps: int  # decode steps the model's batch has taken


class TenantShare:
    """One tenant's service in one class on one node: its virtual-time counter's parts.

    counter = base + (tokens - tok0) / weight, with tokens = fixed + for each model it
    decodes on: neg + sequences * model.steps (module docstring).
    """

    __slots__ = ("name", "rank", "weight", "next_weight", "base", "tok0", "fixed", "runs", "queued", "admitted", "fresh")

    def __init__(self, name: str, rank: int, weight: float) -> None:
        self.name = name
        self.rank = rank
        self.weight = weight
        self.next_weight = weight  # the latest request's weight, taken at the next lift
        self.base = 0.0
        self.tok0 = 0
        self.fixed = 0  # tokens of finished prefills and finished decode segments
        self.runs: dict[_Stepped, list[int]] = {}  # model -> [-(sum of steps at joining), sequences]
        self.queued = 0  # waiting (or parked after a preemption) on this node
        self.admitted = 0  # prefilling or decoding on this node
        self.fresh = False  # became active since the last lift of its class

    def tokens(self) -> int:
        n = self.fixed
        for m, (neg, k) in self.runs.items():
            n += neg + k * m.steps
        return n

    def counter(self) -> float:
        return self.base + (self.tokens() - self.tok0) / self.weight

    @property
    def active(self) -> bool:
        return self.queued > 0 or self.admitted > 0

    def join(self, m: _Stepped) -> int:
        """A sequence of this tenant starts decoding on `m`; returns the step count to keep."""
        run = self.runs.get(m)
        if run is None:
            run = self.runs[m] = [0, 0]
        steps = m.steps
        run[0] -= steps
        run[1] += 1
        return steps

    def leave(self, m: _Stepped, joined: int, steps: int) -> None:
        """A sequence that joined at step `joined` stops decoding on `m` after step `steps`."""
        run = self.runs[m]
        run[0] += joined
        run[1] -= 1
        if not run[1]:
            del self.runs[m]
        self.fixed += steps - joined


class FairShares:
    """A node's tenants, per class, and the lifts that keep idle ones from banking credit."""

    __slots__ = ("tenants", "fresh", "mark")

    def __init__(self) -> None:
        self.tenants: list[dict[str, TenantShare]] = [{} for _ in range(N_CLASSES)]
        self.fresh: list[list[TenantShare]] = [[] for _ in range(N_CLASSES)]
        # per class: the highest counter a tenant went idle with; a tenant that becomes
        # active when no other is starts there
        self.mark: list[float] = [0.0] * N_CLASSES

    def enqueue(self, rank: int, name: str, weight: float) -> TenantShare:
        """One more request of tenant `name` waits in class `rank` (a submission): its
        share, marked as becoming active if it had nothing on the node."""
        ts = self.tenants[rank].get(name)
        if ts is None:
            ts = self.tenants[rank][name] = TenantShare(name, rank, weight)
        if not ts.queued and not ts.admitted and not ts.fresh:
            ts.fresh = True
            self.fresh[rank].append(ts)
        ts.next_weight = weight
        ts.queued += 1
        return ts

    def floor(self, rank: int) -> float:
        """Where a tenant becoming active in class `rank` starts: the least counter of the
        class's other active tenants, or the mark when there are none."""
        low = None
        for ts in self.tenants[rank].values():
            if ts.fresh or not ts.active:
                continue
            c = ts.counter()
            if low is None or c < low:
                low = c
        return self.mark[rank] if low is None else low

    @staticmethod
    def effective(ts: TenantShare, floor: float) -> float:
        """`ts`'s counter as a pick reads it (lifted if it became active since the last lift)."""
        c = ts.counter()
        return c if not ts.fresh or c >= floor else floor

    def settle(self, rank: int) -> None:
        """Apply the lifts of class `rank`'s tenants that became active (an admission in
        the class is about to pick): each starts at `effective`, with its latest weight."""
        fresh = self.fresh[rank]
        floor = self.floor(rank)
        keep = []
        for ts in fresh:
            if not ts.active:  # its requests went before it was picked: lift it when it is back
                keep.append(ts)
                continue
            ts.base = self.effective(ts, floor)
            ts.tok0 = ts.tokens()
            ts.weight = ts.next_weight
            ts.fresh = False
        self.fresh[rank] = keep

    def idle(self, ts: TenantShare) -> None:
        """`ts` may have nothing left on the node: raise the mark to its counter if so."""
        if not ts.active and not ts.fresh:
            c = ts.counter()
            if c > self.mark[ts.rank]:
                self.mark[ts.rank] = c
