"""Inter-token gaps as a small fixed histogram: what fast mode keeps instead of tokens.

The autoscaler acts on a node's per-token p95 inter-token latency. Fast mode (the
simulator's engine, no token events) cannot sample every gap as the live driver does,
but a batch's gaps inside one run of decode steps are the same for all its sequences, so
the engine counts them once per run into log-spaced buckets and adds the counts to each
request (`RequestFinished.itl_buckets`). A bucket spans a factor of 2^(1/16), so the
middle of the bucket a quantile lands in is within 2.2% of the exact per-token quantile.
Gaps under `FLOOR` (the `zero` profile) share bucket 0, which reads as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

import numpy as np

__all__ = ["BUCKETS_PER_OCTAVE", "FLOOR", "add", "bucket", "bucket_value", "buckets", "quantile"]

FLOOR: Final = 1e-6  # seconds
BUCKETS_PER_OCTAVE: Final = 16
_SCALE: Final = BUCKETS_PER_OCTAVE / math.log(2.0)


def bucket(gap: float) -> int:
    """The bucket of a gap in seconds: 0 below `FLOOR`, else 1 + its 16ths of an octave above it."""
    if gap < FLOOR:
        return 0
    return 1 + int(math.log(gap / FLOOR) * _SCALE)


def buckets(gaps: np.ndarray) -> np.ndarray:
    """`bucket` of every gap (NumPy's log may differ from `math.log` in the last bit, which
    moves a gap only across a bucket's edge)."""
    with np.errstate(divide="ignore"):
        b = 1 + np.floor(np.log(np.maximum(gaps, FLOOR) / FLOOR) * _SCALE).astype(np.int64)
    return np.where(gaps < FLOOR, 0, b)


def bucket_value(b: int) -> float:
    """The gap a bucket stands for: its geometric middle (0 for bucket 0)."""
    if b <= 0:
        return 0.0
    return FLOOR * 2.0 ** ((b - 0.5) / BUCKETS_PER_OCTAVE)


def add(into: dict[int, int], counts: Iterable[tuple[int, int]]) -> None:
    for b, n in counts:
        into[b] = into.get(b, 0) + n


def quantile(counts: Mapping[int, int], q: float) -> float | None:
    """The `q` quantile (nearest rank, as `tierflow.scaling.window.quantile`) of the gaps
    counted; None when there are none."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for b in sorted(counts):
        seen += counts[b]
        if seen >= rank:
            return bucket_value(b)
    return bucket_value(max(counts))
