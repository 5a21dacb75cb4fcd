"""Which node to give back on scale-down: the one whose removal costs least.

Kubernetes' default (newest pod first) would often pick the node the router just warmed
up and is sending work to. Here the order is: fewest requests in flight (least to
drain, quickest to stop), then coldest (fewest prefix-cache blocks, fewest models in
HBM: least warmth lost), then newest, then id (deterministic). Only ready nodes are
candidates: a node an operator cordoned is theirs to manage.
"""

from __future__ import annotations

from collections.abc import Sequence

from msgspec import Struct

__all__ = ["NodeLoad", "choose_victims"]


class NodeLoad(Struct, frozen=True, kw_only=True):
    node_id: str
    in_flight: int = 0
    prefix_cache_blocks: int = 0
    hot_models: int = 0
    started_at: float = 0.0
    cordoned: bool = False


def _cost(n: NodeLoad) -> tuple[int, int, int, float, str]:
    return (n.in_flight, n.prefix_cache_blocks, n.hot_models, -n.started_at, n.node_id)


def choose_victims(nodes: Sequence[NodeLoad], count: int) -> list[str]:
    """Up to `count` node ids to remove, cheapest first (never a cordoned node)."""
    if count <= 0:
        return []
    candidates = sorted((n for n in nodes if not n.cordoned), key=_cost)
    return [n.node_id for n in candidates[:count]]
