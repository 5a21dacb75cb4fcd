"""Arrival times per phase kind: exact grids, and Poisson processes held to 4-sigma bounds with fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tierflow.workload.arrivals import arrival_times, phase_rate, phase_times, run_length
from tierflow.workload.spec import Arrival


def _rng(seed: int = 1) -> np.random.Generator:
    return np.random.default_rng(seed)


def _within(count: float, expected: float, sigmas: float = 4.0) -> bool:
    return abs(count - expected) <= sigmas * math.sqrt(expected)


def test_steady_is_an_exact_grid_from_zero() -> None:
    times = phase_times(Arrival(kind="steady", rate=2.0, duration_s=10.0), _rng())
    assert times.tolist() == [k / 2 for k in range(20)]
    assert phase_times(Arrival(kind="steady", rate=3.0, duration_s=1.0), _rng()).size == 3
    assert phase_times(Arrival(kind="steady", rate=2.0, duration_s=10.0), _rng(), rate_scale=2.0).size == 40


def test_poisson_has_the_rate_and_exponential_gaps() -> None:
    times = phase_times(Arrival(kind="poisson", rate=50.0, duration_s=200.0), _rng(7))
    assert _within(times.size, 10_000)
    gaps = np.diff(times)
    assert 0.95 < gaps.std() / gaps.mean() < 1.05  # exponential: coefficient of variation 1 (a grid has 0)
    assert times.min() >= 0 and times.max() < 200 and np.all(gaps > 0)
    doubled = phase_times(Arrival(kind="poisson", rate=50.0, duration_s=200.0), _rng(8), rate_scale=2.0)
    assert _within(doubled.size, 20_000)


def test_bursts_run_at_burst_rate_in_the_last_burst_s_of_each_cycle() -> None:
    phase = Arrival(kind="bursts", rate=1.0, burst_rate=20.0, every_s=60.0, burst_s=10.0, duration_s=6000.0)
    times = phase_times(phase, _rng(3))
    in_burst = np.mod(times, 60.0) >= 50.0
    assert _within(int(in_burst.sum()), 20.0 * 10 * 100)  # 100 cycles of 10 s at 20/s
    assert _within(int((~in_burst).sum()), 1.0 * 50 * 100)  # and of 50 s at 1/s
    assert phase_rate(phase, np.array([0.0, 49.9, 50.0, 59.9, 60.0])).tolist() == [1.0, 1.0, 20.0, 20.0, 1.0]


def test_diurnal_follows_the_sine_by_thinning() -> None:
    phase = Arrival(kind="diurnal", rate=10.0, amplitude=0.5, period_s=100.0, duration_s=10_000.0)
    times = phase_times(phase, _rng(5))
    rising = np.mod(times, 100.0) < 50.0  # sin > 0 in the first half of each period
    per_half = 10.0 * 50.0  # arrivals of a half period at the mean rate
    swing = 10.0 * 0.5 * 100.0 / math.pi  # integral of rate * amplitude * sin over a half period
    assert _within(int(rising.sum()), 100 * (per_half + swing))  # 65,915
    assert _within(int((~rising).sum()), 100 * (per_half - swing))  # 34,085
    assert phase_rate(phase, np.array([25.0, 75.0])) == pytest.approx([15.0, 5.0])


def test_phases_run_back_to_back_and_the_duration_caps_them() -> None:
    phases = [Arrival(kind="steady", rate=1.0, duration_s=10.0), Arrival(kind="steady", rate=2.0, duration_s=10.0)]
    assert arrival_times(phases, seed=0).tolist() == [*range(10), *(10 + k / 2 for k in range(20))]
    capped = arrival_times(phases, seed=0, duration_s=12.0)
    assert capped.tolist() == [*range(10), 10.0, 10.5, 11.0, 11.5]
    assert arrival_times(phases, seed=0, duration_s=5.0).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert run_length(phases) == 20.0 and run_length(phases, duration_s=12.0) == 12.0


def test_seeded_and_each_phase_on_its_own_stream() -> None:
    first = Arrival(kind="poisson", rate=5.0, duration_s=100.0)
    a = arrival_times([first], seed=9)
    assert np.array_equal(a, arrival_times([first], seed=9))
    assert not np.array_equal(a, arrival_times([first], seed=10))
    # A phase added or changed later leaves the earlier phases' arrivals where they were.
    longer = arrival_times([first, Arrival(kind="diurnal", rate=3.0, amplitude=0.2, period_s=10.0, duration_s=50.0)], seed=9)
    assert np.array_equal(longer[: a.size], a) and np.all(longer[a.size :] >= 100.0)


def test_bad_scale_or_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="rate_scale must be > 0"):
        phase_times(Arrival(kind="poisson", rate=1.0, duration_s=1.0), _rng(), rate_scale=0.0)
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        arrival_times([Arrival(kind="poisson", rate=1.0, duration_s=1.0)], seed=0, duration_s=0.0)
