"""The first placement: healthy nodes that serve the model, least loaded first.

Kept for the router until it switches to a `PlacementPolicy` (`LeastLoaded` in
`baselines` is the same ranking behind the policy interface, with boundaries, versions
and a reason per choice). `NodeView` now lives in `view`; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tierflow.placement.view import NodeView

__all__ = ["NodeView", "eligible", "rank_least_loaded"]


def eligible(nodes: Iterable[NodeView], model: str, now: float) -> list[NodeView]:
    """Nodes that may take a request for `model` right now (any version, any region)."""
    return [n for n in nodes if model in n.slots and n.takes_work(now)]


def rank_least_loaded(nodes: Sequence[NodeView], model: str, now: float, *, turn: int = 0) -> list[str]:
    """Eligible node ids, least loaded first; `turn` rotates ties so equal nodes share work."""
    candidates = eligible(nodes, model, now)
    if not candidates:
        return []
    k = turn % len(candidates)
    rotated = candidates[k:] + candidates[:k]
    return [n.node_id for n in sorted(rotated, key=lambda n: n.load)]
