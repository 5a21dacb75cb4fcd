"""Scaling signals: each reads one thing off a pool snapshot and asks for a replica count.

A signal returns an `Ask` (how many replicas, the measured value, its target) or None
when its input is unknown (it abstains). The policy takes the largest ask, so the
signal that asks for most decides and is named in the decision.

Load signals (utilization, queue, prompt tokens) are proportional: they size the pool
for the work in the snapshot. Latency signals are one-sided on purpose: latency at low
load is dominated by fixed costs and says nothing about how few replicas would do, so
above the SLO they ask for proportionally more, between `headroom * SLO` and the SLO
they hold the current count, and below that they ask for nothing.

Which signals apply depends on the pool: an aggregated node prefills and decodes (all
four), a disaggregated prefill pool scales on TTFT, queued prompt tokens and queue, a
disaggregated decode pool on running batch and inter-token latency.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

from msgspec import Struct

from tierflow.scaling.config import ScalingConfig
from tierflow.scaling.snapshot import PoolSnapshot

__all__ = ["Ask", "Signal", "SIGNALS", "POOL_SIGNALS", "signals_for", "evaluate"]

_EPS = 1e-9  # (4 / (4 * 0.5)) must be 2, not 3, whatever the float rounding


class Ask(Struct, frozen=True, kw_only=True):
    signal: str
    replicas: int
    value: float
    target: float


Signal = Callable[[PoolSnapshot, ScalingConfig], Ask | None]


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPS))


def utilization(s: PoolSnapshot, c: ScalingConfig) -> Ask | None:
    """Running batch plus queue over batch slots, against `target_utilization`."""
    if s.ready == 0 or s.running is None or s.waiting is None or not s.batch_slots:
        return None
    load = s.running + s.waiting
    per_replica = s.batch_slots / s.ready
    return Ask(signal="utilization", replicas=_ceil(load / (per_replica * c.target_utilization)),
               value=load / s.batch_slots, target=c.target_utilization)


def queue(s: PoolSnapshot, c: ScalingConfig) -> Ask | None:
    """Waiting requests per ready replica, against `target_queue_per_replica`."""
    if s.ready == 0 or s.waiting is None:
        return None
    return Ask(signal="queue", replicas=_ceil(s.waiting / c.target_queue_per_replica),
               value=s.waiting / s.ready, target=c.target_queue_per_replica)


def prompt_tokens(s: PoolSnapshot, c: ScalingConfig) -> Ask | None:
    """Prompt tokens waiting for prefill, against `target_prompt_tokens_per_replica`."""
    if s.ready == 0 or s.queued_prompt_tokens is None:
        return None
    return Ask(signal="prompt_tokens", replicas=_ceil(s.queued_prompt_tokens / c.target_prompt_tokens_per_replica),
               value=s.queued_prompt_tokens / s.ready, target=float(c.target_prompt_tokens_per_replica))


def _latency(name: str, p95: float | None, slo: float, s: PoolSnapshot, c: ScalingConfig) -> Ask | None:
    if slo <= 0 or p95 is None or s.ready == 0:
        return None
    ratio = p95 / slo
    if ratio > 1.0:
        replicas = max(s.ready + 1, _ceil(s.ready * ratio))
    elif ratio >= c.latency_headroom:
        replicas = s.ready
    else:
        replicas = 0
    return Ask(signal=name, replicas=replicas, value=p95, target=slo)


def ttft(s: PoolSnapshot, c: ScalingConfig) -> Ask | None:
    """p95 time to first token against `ttft_slo`."""
    return _latency("ttft", s.ttft_p95, c.ttft_slo, s, c)


def itl(s: PoolSnapshot, c: ScalingConfig) -> Ask | None:
    """p95 inter-token latency against `itl_slo`."""
    return _latency("itl", s.itl_p95, c.itl_slo, s, c)


SIGNALS: Final[dict[str, Signal]] = {
    "utilization": utilization,
    "queue": queue,
    "prompt_tokens": prompt_tokens,
    "ttft": ttft,
    "itl": itl,
}

# (deployment mode, pool) -> the signals that size that pool.
POOL_SIGNALS: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    ("aggregated", "decode"): ("utilization", "queue", "ttft", "itl"),
    ("disaggregated", "decode"): ("utilization", "itl"),
    ("disaggregated", "prefill"): ("ttft", "prompt_tokens", "queue"),
}


def signals_for(mode: str, pool: str) -> tuple[str, ...]:
    try:
        return POOL_SIGNALS[(mode, pool)]
    except KeyError:
        raise ValueError(f"no scaling signals for the {pool!r} pool of an {mode!r} deployment") from None


def evaluate(mode: str, pool: str, snapshot: PoolSnapshot, config: ScalingConfig) -> list[Ask]:
    """Every applicable signal's ask; signals with unknown inputs are left out."""
    asks = (SIGNALS[name](snapshot, config) for name in signals_for(mode, pool))
    return [a for a in asks if a is not None]
