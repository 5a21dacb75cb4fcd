"""Where model weights live on one node, and what moving them costs.

Three places: host storage (``cold``: not on the node), DDR, and HBM. The hierarchy is
inclusive: a model in HBM also keeps its DDR copy, so evicting it from HBM moves no bytes
and is instant, while bringing it back is a DDR -> HBM copy. A cold model first streams
from storage into DDR. Every copy goes through a `TransferLedger`, which records bytes and
the seconds charged per tier pair, so no byte moves for free.

Eviction is by hotness: an exponentially decayed request count (half-life
`half_life_s`), so both recency and frequency count; ties go to the least recently used,
then to the name (deterministic). A model with requests in flight (pinned) or still
loading is never evicted, and no placement ever exceeds a tier's capacity: a load that
cannot fit returns no plan instead.

The KV cache's HBM share is carved out before this class sees the capacity; see
`tierflow.rdu.kvcache`.
"""

from __future__ import annotations

import math
from typing import Final, Literal

import msgspec

__all__ = ["TierName", "TransferLedger", "LoadPlan", "WeightTiers"]

TierName = Literal["hbm", "ddr", "loading", "cold"]


class TransferLedger:
    """Bytes moved and seconds charged per tier pair ("src->dst"). One per engine."""

    __slots__ = ("_bytes", "_seconds")

    def __init__(self) -> None:
        self._bytes: dict[str, int] = {}
        self._seconds: dict[str, float] = {}

    def charge(self, src: str, dst: str, nbytes: int, bandwidth: float) -> float:
        """Record a copy and return its duration at `bandwidth` bytes/s."""
        if nbytes <= 0:
            return 0.0
        seconds = nbytes / bandwidth
        key = f"{src}->{dst}"
        self._bytes[key] = self._bytes.get(key, 0) + nbytes
        self._seconds[key] = self._seconds.get(key, 0.0) + seconds
        return seconds

    def bytes_moved(self) -> dict[str, int]:
        return dict(self._bytes)

    def seconds(self) -> dict[str, float]:
        return dict(self._seconds)


class LoadPlan(msgspec.Struct, frozen=True):
    """What bringing `model` into HBM takes: evictions first, then the copies."""

    model: str
    source: Literal["ddr", "cold"]
    nbytes: int
    evict_hbm: tuple[str, ...]  # drop from HBM (DDR copy stays): free and instant
    evict_ddr: tuple[str, ...]  # drop from DDR to make room for a cold load: back to cold
    storage_seconds: float  # storage -> DDR (cold only)
    copy_seconds: float  # DDR -> HBM

    @property
    def seconds(self) -> float:
        return self.storage_seconds + self.copy_seconds


class _Entry:
    __slots__ = ("nbytes", "tier", "pins", "score", "score_at", "last_used")

    def __init__(self, nbytes: int, tier: TierName) -> None:
        self.nbytes = nbytes
        self.tier: TierName = tier
        self.pins = 0
        self.score = 0.0
        self.score_at = -math.inf
        self.last_used: float | None = None


_IN_HBM: Final = frozenset(("hbm", "loading"))
_IN_DDR: Final = frozenset(("hbm", "loading", "ddr"))


class WeightTiers:
    """Weight placement of one node's models across storage, DDR and HBM."""

    def __init__(
        self,
        *,
        hbm_capacity: int,
        ddr_capacity: int,
        switch_bw: float,
        storage_bw: float,
        ledger: TransferLedger,
        half_life_s: float = 300.0,
    ) -> None:
        if hbm_capacity <= 0 or ddr_capacity <= 0:
            raise ValueError("tier capacities must be positive")
        self.hbm_capacity = hbm_capacity
        self.ddr_capacity = ddr_capacity
        self._switch_bw = switch_bw
        self._storage_bw = storage_bw
        self._ledger = ledger
        self._decay = math.log(2) / half_life_s
        self._models: dict[str, _Entry] = {}

    # -- registration and inspection --
    def add(self, name: str, nbytes: int, *, tier: Literal["cold", "ddr", "hbm"] = "ddr") -> None:
        """Register a model already placed at `tier` (no copy charged: it was there before)."""
        if name in self._models:
            raise ValueError(f"model {name!r} is already registered")
        if nbytes <= 0:
            raise ValueError(f"model {name!r}: weight bytes must be positive, got {nbytes}")
        if tier != "cold" and self.ddr_used + nbytes > self.ddr_capacity:
            raise ValueError(
                f"model {name!r} ({nbytes / 1e9:.1f} GB) does not fit in DDR:"
                f" {self.ddr_used / 1e9:.1f} of {self.ddr_capacity / 1e9:.1f} GB already used"
            )
        if tier == "hbm" and self.hbm_used + nbytes > self.hbm_capacity:
            raise ValueError(
                f"model {name!r} ({nbytes / 1e9:.1f} GB) does not fit in HBM:"
                f" {self.hbm_used / 1e9:.1f} of {self.hbm_capacity / 1e9:.1f} GB already used"
            )
        self._models[name] = _Entry(nbytes, tier)

    def names(self) -> list[str]:
        return list(self._models)

    def tier(self, name: str) -> TierName:
        return self._models[name].tier

    def nbytes(self, name: str) -> int:
        return self._models[name].nbytes

    def pins(self, name: str) -> int:
        return self._models[name].pins

    def last_used(self, name: str) -> float | None:
        return self._models[name].last_used

    @property
    def hbm_used(self) -> int:
        return sum(e.nbytes for e in self._models.values() if e.tier in _IN_HBM)

    @property
    def ddr_used(self) -> int:
        return sum(e.nbytes for e in self._models.values() if e.tier in _IN_DDR)

    # -- hotness --
    def touch(self, name: str, now: float) -> None:
        """One more use of `name` at `now`."""
        e = self._models[name]
        e.score = self.hotness(name, now) + 1.0
        e.score_at = now
        e.last_used = now

    def hotness(self, name: str, now: float) -> float:
        e = self._models[name]
        if e.score == 0.0:
            return 0.0
        return e.score * math.exp(-self._decay * max(0.0, now - e.score_at))

    # -- pinning: requests in flight --
    def pin(self, name: str) -> None:
        e = self._models[name]
        if e.tier != "hbm":
            raise RuntimeError(f"cannot pin {name!r}: its weights are in {e.tier}, not HBM")
        e.pins += 1

    def unpin(self, name: str) -> None:
        e = self._models[name]
        if e.pins <= 0:
            raise RuntimeError(f"unpin of {name!r} without a matching pin")
        e.pins -= 1

    # -- loading --
    def _victims(self, names: list[str], need: int, free: int, now: float) -> list[str] | None:
        if free >= need:
            return []
        order = sorted(
            names,
            key=lambda n: (self.hotness(n, now), self._models[n].last_used or -math.inf, n),
        )
        chosen: list[str] = []
        for n in order:
            chosen.append(n)
            free += self._models[n].nbytes
            if free >= need:
                return chosen
        return None

    def plan_load(self, name: str, now: float) -> LoadPlan | None:
        """How to bring `name` into HBM now, or None if pinned models leave no room."""
        e = self._models[name]
        if e.tier in _IN_HBM:
            raise RuntimeError(f"{name!r} is already {e.tier}")
        evict_ddr: list[str] = []
        if e.tier == "cold":
            ddr_candidates = [n for n, m in self._models.items() if m.tier == "ddr" and n != name]
            found = self._victims(ddr_candidates, e.nbytes, self.ddr_capacity - self.ddr_used, now)
            if found is None:
                return None
            evict_ddr = found
        hbm_candidates = [n for n, m in self._models.items() if m.tier == "hbm" and m.pins == 0]
        evict_hbm = self._victims(hbm_candidates, e.nbytes, self.hbm_capacity - self.hbm_used, now)
        if evict_hbm is None:
            return None
        cold = e.tier == "cold"
        return LoadPlan(
            model=name,
            source="cold" if cold else "ddr",
            nbytes=e.nbytes,
            evict_hbm=tuple(evict_hbm),
            evict_ddr=tuple(evict_ddr),
            storage_seconds=e.nbytes / self._storage_bw if cold else 0.0,
            copy_seconds=e.nbytes / self._switch_bw,
        )

    def begin_load(self, name: str, now: float) -> LoadPlan:
        """Apply a load plan: evict, charge the copies, mark `name` loading. Raises if none."""
        plan = self.plan_load(name, now)
        if plan is None:
            raise RuntimeError(f"no room in HBM for {name!r}: every resident model is pinned")
        for victim in plan.evict_hbm:
            self._models[victim].tier = "ddr"  # the DDR copy is still there: nothing moves
        for victim in plan.evict_ddr:
            self._models[victim].tier = "cold"  # storage still holds it: nothing moves
        if plan.source == "cold":
            self._ledger.charge("storage", "ddr", plan.nbytes, self._storage_bw)
        self._ledger.charge("ddr", "hbm", plan.nbytes, self._switch_bw)
        self._models[name].tier = "loading"
        return plan

    def finish_load(self, name: str) -> None:
        e = self._models[name]
        if e.tier != "loading":
            raise RuntimeError(f"{name!r} is not loading (it is {e.tier})")
        e.tier = "hbm"
