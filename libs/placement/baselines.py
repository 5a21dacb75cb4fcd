"""Baseline policies to compare hotness-aware placement against: round-robin, least-loaded, random.

They share the filter (`filters.eligible`: health, model, version, boundary) with
`HotnessAware` and ignore everything it scores, which is the point of a baseline. Each
keeps its state (turn counter, generator) on its instance, so two routers or two
simulation runs never share it and a seeded run repeats exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from heapq import nsmallest

from tierflow.placement.filters import Candidate, diagnose, eligible
from tierflow.placement.policy import Choice, Placement, check_limit, prefix_run
from tierflow.placement.request import PlacementRequest
from tierflow.placement.view import NodeView

__all__ = ["RoundRobin", "LeastLoaded", "Random"]


def _choice(candidate: Candidate, request: PlacementRequest, score: float, reason: str) -> Choice:
    node, slot = candidate
    return Choice(
        node_id=node.node_id,
        tier=slot.tier,
        prefix_blocks=prefix_run(node, slot, request),
        affinity=node.node_id == request.affinity_node,
        score=score,
        reason=reason,
    )


class RoundRobin:
    """Eligible nodes in turn: each call starts one further along the eligible list."""

    name = "round-robin"
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def rank(
        self, nodes: Sequence[NodeView], request: PlacementRequest, now: float, *, limit: int | None = None
    ) -> Placement:
        check_limit(limit)
        candidates = eligible(nodes, request, now)
        n = len(candidates)
        if not n:
            raise diagnose(nodes, request, now)
        start = self._turn % n
        self._turn += 1
        count = n if limit is None else min(limit, n)
        return Placement(
            policy=self.name,
            choices=tuple(_choice(candidates[(start + j) % n], request, float(j), self.name) for j in range(count)),
            eligible=n,
        )


class LeastLoaded:
    """Least `NodeView.load` (queued + running per batch slot) first; ties rotate per call."""

    name = "least-loaded"
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def rank(
        self, nodes: Sequence[NodeView], request: PlacementRequest, now: float, *, limit: int | None = None
    ) -> Placement:
        check_limit(limit)
        candidates = eligible(nodes, request, now)
        n = len(candidates)
        if not n:
            raise diagnose(nodes, request, now)
        self._turn += 1
        turn = self._turn
        keyed = [(c[0].load, (i + turn) % n, c) for i, c in enumerate(candidates)]
        top = nsmallest(limit, keyed) if limit is not None and limit < n else sorted(keyed)
        return Placement(
            policy=self.name,
            choices=tuple(_choice(c, request, load, self.name) for load, _, c in top),
            eligible=n,
        )


class Random:
    """Eligible nodes in a random order from the instance's own seeded generator."""

    name = "random"
    __slots__ = ("_rng",)

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def rank(
        self, nodes: Sequence[NodeView], request: PlacementRequest, now: float, *, limit: int | None = None
    ) -> Placement:
        check_limit(limit)
        candidates = eligible(nodes, request, now)
        n = len(candidates)
        if not n:
            raise diagnose(nodes, request, now)
        picked = self._rng.sample(candidates, n if limit is None else min(limit, n))
        return Placement(
            policy=self.name,
            choices=tuple(_choice(c, request, float(j), self.name) for j, c in enumerate(picked)),
            eligible=n,
        )
