"""Weight tiers: capacity never exceeded, nothing in use evicted, every byte paid for in time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tierflow.rdu.memory import TransferLedger, WeightTiers

GB = 10**9
SWITCH_BW, STORAGE_BW = 1e12, 25e9


def tiers(hbm: int = 100 * GB, ddr: int = 300 * GB) -> tuple[WeightTiers, TransferLedger]:
    ledger = TransferLedger()
    w = WeightTiers(
        hbm_capacity=hbm,
        ddr_capacity=ddr,
        switch_bw=SWITCH_BW,
        storage_bw=STORAGE_BW,
        ledger=ledger,
        half_life_s=60.0,
    )
    return w, ledger


def test_switch_from_ddr_costs_the_copy_and_cold_adds_storage() -> None:
    w, ledger = tiers()
    w.add("warm", 16 * GB, tier="ddr")
    w.add("cold", 16 * GB, tier="cold")
    warm = w.begin_load("warm", 0.0)
    assert (warm.source, warm.storage_seconds, warm.copy_seconds) == (
        "ddr",
        0.0,
        16 * GB / SWITCH_BW,
    )
    cold = w.begin_load("cold", 0.0)
    assert cold.source == "cold" and cold.storage_seconds == pytest.approx(16 * GB / STORAGE_BW)
    assert ledger.bytes_moved() == {"ddr->hbm": 32 * GB, "storage->ddr": 16 * GB}
    assert w.tier("cold") == "loading"
    w.finish_load("cold")
    assert w.tier("cold") == "hbm"


def test_eviction_prefers_cold_models_and_never_pinned_ones() -> None:
    w, _ = tiers(hbm=50 * GB)
    for name in ("a", "b"):
        w.add(name, 20 * GB, tier="hbm")
    w.add("c", 20 * GB, tier="ddr")
    for t in (1.0, 2.0, 3.0):
        w.touch("a", t)  # a is hot: three uses
    w.touch("b", 4.0)  # b is more recent but used once
    plan = w.plan_load("c", 5.0)
    assert plan is not None and plan.evict_hbm == ("b",)
    w.pin("b")
    plan = w.plan_load("c", 5.0)
    assert plan is not None and plan.evict_hbm == ("a",)
    w.pin("a")
    assert w.plan_load("c", 5.0) is None  # everything resident is in use: no room, no plan
    with pytest.raises(RuntimeError):
        w.begin_load("c", 5.0)


def test_hotness_decays_with_time() -> None:
    w, _ = tiers()
    w.add("m", GB)
    w.touch("m", 0.0)
    assert w.hotness("m", 0.0) == pytest.approx(1.0)
    assert w.hotness("m", 60.0) == pytest.approx(0.5)


def test_registration_respects_capacity() -> None:
    w, _ = tiers(hbm=10 * GB, ddr=20 * GB)
    w.add("a", 8 * GB, tier="hbm")
    with pytest.raises(ValueError, match="HBM"):
        w.add("b", 8 * GB, tier="hbm")
    w.add("c", 8 * GB, tier="ddr")
    with pytest.raises(ValueError, match="DDR"):
        w.add("d", 8 * GB, tier="ddr")
    w.add("e", 50 * GB, tier="cold")  # storage is not the node's to bound


class WeightTierMachine(RuleBasedStateMachine):
    """Random registrations, uses, pins and loads against a small node."""

    @initialize(
        sizes=st.lists(st.integers(1, 60), min_size=2, max_size=6),
        hbm=st.integers(60, 150),
        ddr=st.integers(100, 250),
        tiers_=st.lists(st.sampled_from(["cold", "ddr", "hbm"]), min_size=6, max_size=6),
    )
    def setup(self, sizes: list[int], hbm: int, ddr: int, tiers_: list[str]) -> None:
        self.w, self.ledger = tiers(hbm * GB, ddr * GB)
        self.names: list[str] = []
        self.expected = {"ddr->hbm": 0, "storage->ddr": 0}
        self.now = 0.0
        for i, (size, tier) in enumerate(zip(sizes, tiers_, strict=False)):
            try:
                self.w.add(f"m{i}", size * GB, tier=tier)  # type: ignore[arg-type]
            except ValueError:
                self.w.add(f"m{i}", size * GB, tier="cold")
            self.names.append(f"m{i}")

    @rule(i=st.integers(0, 5), dt=st.floats(0, 100))
    def touch(self, i: int, dt: float) -> None:
        self.now += dt
        self.w.touch(self.names[i % len(self.names)], self.now)

    @rule(i=st.integers(0, 5))
    def pin(self, i: int) -> None:
        name = self.names[i % len(self.names)]
        if self.w.tier(name) == "hbm":
            self.w.pin(name)

    @rule(i=st.integers(0, 5))
    def unpin(self, i: int) -> None:
        name = self.names[i % len(self.names)]
        if self.w.pins(name):
            self.w.unpin(name)

    @rule(i=st.integers(0, 5))
    def load(self, i: int) -> None:
        name = self.names[i % len(self.names)]
        if self.w.tier(name) not in ("ddr", "cold"):
            return
        pinned = {n for n in self.names if self.w.pins(n)}
        plan = self.w.plan_load(name, self.now)
        if plan is None:
            return
        assert not pinned & set(plan.evict_hbm)
        self.w.begin_load(name, self.now)
        self.expected["ddr->hbm"] += plan.nbytes
        if plan.source == "cold":
            self.expected["storage->ddr"] += plan.nbytes
        assert all(self.w.tier(n) == "hbm" for n in pinned), "a model in use was evicted"
        self.w.finish_load(name)

    @invariant()
    def capacity_is_never_exceeded(self) -> None:
        assert self.w.hbm_used <= self.w.hbm_capacity
        assert self.w.ddr_used <= self.w.ddr_capacity

    @invariant()
    def pinned_models_stay_in_hbm(self) -> None:
        for n in self.names:
            if self.w.pins(n):
                assert self.w.tier(n) == "hbm"

    @invariant()
    def every_byte_moved_is_charged_in_time(self) -> None:
        moved, seconds = self.ledger.bytes_moved(), self.ledger.seconds()
        for pair, bw in (("ddr->hbm", SWITCH_BW), ("storage->ddr", STORAGE_BW)):
            assert moved.get(pair, 0) == self.expected[pair]
            assert seconds.get(pair, 0.0) == pytest.approx(moved.get(pair, 0) / bw)


TestWeightTierMachine = WeightTierMachine.TestCase
TestWeightTierMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 1000)), max_size=30))
@settings(max_examples=50, deadline=None)
def test_hotness_is_never_negative_and_orders_evictions_deterministically(
    uses: list[tuple[str, float]],
) -> None:
    w, _ = tiers(hbm=45 * GB)
    for name in "abc":
        w.add(name, 20 * GB, tier="hbm" if name != "c" else "ddr")
    now = 0.0
    for name, dt in uses:
        now += dt
        w.touch(name, now)
    assert all(w.hotness(n, now) >= 0 for n in "abc")
    if w.tier("c") == "ddr":
        first, second = w.plan_load("c", now), w.plan_load("c", now)
        assert first == second and first is not None and len(first.evict_hbm) == 1
