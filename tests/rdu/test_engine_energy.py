"""The engine's energy accounting and fast mode's per-token latency histogram."""

from __future__ import annotations

import math

import pytest

from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    BundleModel,
    DeploymentConfig,
    EngineRequest,
    NodeEngine,
    RequestFinished,
    TokenGenerated,
    itl,
)
from tierflow.rdu.energy import POWER, node_energy, power_for, tokens_per_kwh
from tierflow.scaling.window import quantile

SN40L = BUILTIN_PROFILES["sn40l-16"]
CFG = DeploymentConfig.parse("ss8192-bs16")
NAMES = ("llama-3.1-8b", "llama-3.1-70b")
BUNDLE = [BundleModel(BUILTIN_MODELS[n], CFG) for n in NAMES]


def drain(engine: NodeEngine) -> list:
    events = []
    while (t := engine.next_event_time()) is not None:
        events += engine.advance(t)
    return events


def test_a_lone_request_pays_the_node_for_its_whole_time() -> None:
    """Batch of one, weights already in HBM: the node's power over prefill + decode."""
    e = NodeEngine(SN40L, BUNDLE[:1], now=0.0, preload=["llama-3.1-8b"])
    e.submit(EngineRequest("a", "llama-3.1-8b", list(range(500)), 200, ignore_eos=True), 0.0)
    (fin,) = [ev for ev in drain(e) if type(ev) is RequestFinished]
    watts = POWER["sn40l-16"].node_active_w
    assert fin.energy_j == pytest.approx(watts * fin.time, rel=1e-9)
    snap = e.snapshot(fin.time)
    assert snap.models[0].energy_joules == pytest.approx(fin.energy_j, rel=1e-9)
    assert snap.energy_joules == pytest.approx(fin.energy_j, rel=1e-9)  # no idle figure: idle is free
    assert snap.power_w == 0.0  # idle now
    assert tokens_per_kwh(200, fin.energy_j) == pytest.approx(200 * 3.6e6 / fin.energy_j)


def traffic(fast: bool) -> tuple[list, NodeEngine]:
    """Two models taking turns, arrivals during decode (runs cut, batches change)."""
    e = NodeEngine(SN40L, BUNDLE, now=0.0, preload=list(NAMES), token_events=not fast)
    events = []
    t = 0.0
    for i in range(40):
        events += e.advance(t)
        prompt = [i % 3] * (100 + 37 * (i % 5)) + list(range(i, i + 60))
        e.submit(EngineRequest(f"r{i}", NAMES[i % 2], prompt, 40 + (i * 53) % 300, ignore_eos=True), t)
        t += 0.013 + 0.05 * ((i * 7919) % 11) / 11
    events += e.advance(math.inf)
    return events, e


def test_request_energy_adds_up_to_the_node_and_is_the_same_in_fast_mode() -> None:
    (slow, engine), (fast, _) = traffic(False), traffic(True)
    finished = {ev.request_id: ev for ev in slow if type(ev) is RequestFinished}
    assert len(finished) == 40
    for ev in fast:
        if type(ev) is RequestFinished:
            assert ev.energy_j == pytest.approx(finished[ev.request_id].energy_j, rel=1e-9)
    # Every joule of prefill and decode went to some request (nothing cancelled, no load ran).
    end = max(ev.time for ev in slow)
    snap = engine.snapshot(end)
    total = sum(ev.energy_j for ev in finished.values())
    assert total == pytest.approx(snap.energy_joules, rel=1e-9)
    assert total == pytest.approx(sum(m.energy_joules for m in snap.models), rel=1e-9)
    assert snap.energy_joules == pytest.approx(node_energy(power_for(SN40L), snap.busy_seconds, end), rel=1e-9)


def test_fast_mode_per_token_p95_is_the_token_modes() -> None:
    """What the autoscaler reads: the p95 over every gap between consecutive tokens."""
    (slow, _), (fast, _) = traffic(False), traffic(True)
    last: dict[str, float] = {}
    gaps: list[float] = []
    for ev in slow:
        if type(ev) is TokenGenerated:
            if ev.index:
                gaps.append(ev.time - last[ev.request_id])
            last[ev.request_id] = ev.time
    counts: dict[int, int] = {}
    for ev in fast:
        if type(ev) is RequestFinished:
            assert sum(n for _, n in ev.itl_buckets) == ev.completion_tokens - 1
            itl.add(counts, ev.itl_buckets)
    assert sum(counts.values()) == len(gaps)
    for q in (0.5, 0.95, 0.99):
        assert itl.quantile(counts, q) == pytest.approx(quantile(gaps, q), rel=0.025)


def test_no_power_figure_charges_nothing() -> None:
    zero = BUILTIN_PROFILES["zero"]
    e = NodeEngine(zero, BUNDLE[:1], now=0.0, preload=["llama-3.1-8b"])
    e.submit(EngineRequest("a", "llama-3.1-8b", list(range(50)), 20, ignore_eos=True), 0.0)
    (fin,) = [ev for ev in drain(e) if type(ev) is RequestFinished]
    assert fin.energy_j == 0.0 and e.snapshot(1.0).energy_joules == 0.0
    assert tokens_per_kwh(20, 0.0) is None


def test_buckets_stand_for_their_gaps() -> None:
    for gap in (0.0, 5e-7, 1e-6, 3.3e-3, 0.0123, 2.5):
        b = itl.bucket(gap)
        assert itl.bucket_value(b) == pytest.approx(gap, rel=0.022) or (gap < itl.FLOOR and b == 0)
