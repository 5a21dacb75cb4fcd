"""When sessions arrive: seeded arrival times for the spec's phases, as numpy arrays.

Each phase is a rate over time (`phase_rate`); steady phases are a fixed grid, the others
are Poisson processes. Time-varying rates (bursts, diurnal) use thinning (Lewis and
Shedler): draw a Poisson process at the phase's peak rate and keep each arrival with
probability rate(t) / peak, which is exact for any bounded rate and needs no inversion
of the rate's integral. Each phase draws from its own stream of the seed, so changing
one phase never moves the arrivals of another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tierflow.workload.spec import Arrival

__all__ = ["phase_rate", "phase_times", "arrival_times", "run_length"]

_ARRIVAL_STREAM = 0x41525256  # namespaces the arrival streams of a seed ("ARRV")


def phase_rate(phase: Arrival, t: np.ndarray, *, rate_scale: float = 1.0) -> np.ndarray:
    """The phase's arrival rate (per second) at times `t` since the phase started.

    Bursts come at the end of each `every_s` cycle, so a run starts at the base rate and
    its first burst hits a warmed-up fleet.
    """
    t = np.asarray(t, dtype=float)
    if phase.kind == "bursts":
        assert phase.burst_rate is not None and phase.every_s is not None and phase.burst_s is not None  # checked by Arrival
        in_burst = np.mod(t, phase.every_s) >= phase.every_s - phase.burst_s
        return np.where(in_burst, phase.burst_rate, phase.rate) * rate_scale
    if phase.kind == "diurnal":
        assert phase.period_s is not None  # checked by Arrival
        return phase.rate * rate_scale * (1.0 + phase.amplitude * np.sin(2.0 * np.pi * t / phase.period_s))
    return np.full_like(t, phase.rate * rate_scale)


def _peak_rate(phase: Arrival, rate_scale: float) -> float:
    if phase.kind == "bursts":
        assert phase.burst_rate is not None
        return max(phase.rate, phase.burst_rate) * rate_scale
    if phase.kind == "diurnal":
        return phase.rate * (1.0 + phase.amplitude) * rate_scale
    return phase.rate * rate_scale


def _poisson(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """A homogeneous Poisson process on [0, duration_s)."""
    expected = rate * duration_s
    # Enough gaps that running out is a < 1e-9 event; topped up in the rare case it is not.
    n = int(expected + 7.0 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while times[-1] < duration_s:
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    return times[times < duration_s]


def phase_times(phase: Arrival, rng: np.random.Generator, *, rate_scale: float = 1.0) -> np.ndarray:
    """Sorted arrival times of one phase, seconds since the phase started."""
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    if phase.kind == "steady":
        rate = phase.rate * rate_scale
        grid = np.arange(math.ceil(phase.duration_s * rate) + 1) / rate
        return grid[grid < phase.duration_s]
    peak = _peak_rate(phase, rate_scale)
    candidates = _poisson(peak, phase.duration_s, rng)
    if phase.kind == "poisson":
        return candidates
    keep = rng.random(candidates.size) * peak < phase_rate(phase, candidates, rate_scale=rate_scale)
    return candidates[keep]


def arrival_times(phases: Sequence[Arrival], *, seed: int, rate_scale: float = 1.0, duration_s: float | None = None) -> np.ndarray:
    """Arrival times of the phases run back to back, seconds since the run started.

    `duration_s` caps the run: later arrivals (and phases) are cut off.
    """
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    parts: list[np.ndarray] = []
    offset = 0.0
    for index, phase in enumerate(phases):
        if duration_s is not None and offset >= duration_s:
            break
        rng = np.random.default_rng([seed, _ARRIVAL_STREAM, index])
        parts.append(offset + phase_times(phase, rng, rate_scale=rate_scale))
        offset += phase.duration_s
    times = np.concatenate(parts) if parts else np.empty(0)
    return times if duration_s is None else times[times < duration_s]


def run_length(phases: Sequence[Arrival], *, duration_s: float | None = None) -> float:
    """How long the arrivals last: the phases back to back, capped by `duration_s`."""
    total = float(sum(phase.duration_s for phase in phases))
    return total if duration_s is None else min(total, duration_s)
