"""A rolling percentile over the last few seconds of samples.

Why here: a node reports its own p95 time-to-first-token and inter-token latency in
its heartbeat, and the autoscaler scales on them. Nodes keep no histograms of their
own, so this is the one small structure both ends agree on. Pure: callers pass `now`;
nothing reads a clock. Bounded in time *and* count, so a busy node keeps a fixed-size
sample (the most recent ones) instead of growing with its token rate.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["RollingHistogram", "RollingQuantile", "quantile"]


def quantile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank on sorted data; `values` must not be empty)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class RollingQuantile:
    """Samples of the last `window` seconds (at most `max_samples`, newest kept)."""

    __slots__ = ("window", "max_samples", "_samples")

    def __init__(self, window: float = 10.0, max_samples: int = 2048) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        self.window = window
        self.max_samples = max_samples
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def observe(self, now: float, value: float) -> None:
        self._samples.append((now, value))

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        samples = self._samples
        while samples and samples[0][0] < horizon:
            samples.popleft()

    def count(self, now: float) -> int:
        """Samples inside the window at `now`."""
        self._expire(now)
        return len(self._samples)

    def value(self, now: float, q: float = 0.95) -> float | None:
        """The `q` quantile of the window at `now`; None when the window is empty
        (no traffic is not the same as zero latency)."""
        self._expire(now)
        if not self._samples:
            return None
        return quantile([v for _, v in self._samples], q)


class RollingHistogram:
    """`RollingQuantile` for samples that come as counts per bucket (`tierflow.rdu.itl`):
    the fleet simulator's fast mode hands over each request's gaps between tokens when it
    finishes, not token by token. Bounded like `RollingQuantile`: the last `window`
    seconds, and the newest entries holding at least `max_samples` samples."""

    __slots__ = ("window", "max_samples", "_entries", "_count")

    def __init__(self, window: float = 10.0, max_samples: int = 2048) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self.max_samples = max_samples
        self._entries: deque[tuple[float, tuple[tuple[int, int], ...], int]] = deque()
        self._count = 0

    def observe(self, now: float, counts: tuple[tuple[int, int], ...]) -> None:
        n = sum(c for _, c in counts)
        if not n:
            return
        entries = self._entries
        entries.append((now, counts, n))
        self._count += n
        while self._count - entries[0][2] >= self.max_samples:
            self._count -= entries.popleft()[2]

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        entries = self._entries
        while entries and entries[0][0] < horizon:
            self._count -= entries.popleft()[2]

    def count(self, now: float) -> int:
        """Samples inside the window at `now`."""
        self._expire(now)
        return self._count

    def value(self, now: float, q: float = 0.95) -> float | None:
        """The `q` quantile of the window at `now` (a bucket's middle); None when empty."""
        from tierflow.rdu import itl  # the buckets' meaning lives with the engine that fills them

        self._expire(now)
        if not self._entries:
            return None
        merged: dict[int, int] = {}
        for _, counts, _n in self._entries:
            itl.add(merged, counts)
        return itl.quantile(merged, q)
