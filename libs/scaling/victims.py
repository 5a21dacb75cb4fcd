"""Which node to give back on scale-down: the one whose removal costs least.

Kubernetes' default (newest pod first) would often pick the node the router just warmed
up and is sending work to. Here the order is: fewest requests in flight (least to
drain, quickest to stop), then coldest (fewest prefix-cache blocks, fewest models in
HBM: least warmth lost), then newest, then id (deterministic). Only ready nodes are
candidates: a node an operator cordoned is theirs to manage.

Not every actuator may choose: a Kubernetes StatefulSet scaled down removes its highest
ordinal, whatever the autoscaler drained. For such pools `highest_ordinals` is the
choice (the Kubernetes actuator offers it; services/autoscaler/scaler.py asks).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from msgspec import Struct

__all__ = ["NodeLoad", "choose_victims", "highest_ordinals", "ordinal"]


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


def ordinal(node_id: str, prefix: str) -> int | None:
    """The ordinal of pod `<prefix>-<n>` (a StatefulSet's pod name), None for any other id."""
    match = re.fullmatch(re.escape(prefix) + r"-(0|[1-9][0-9]*)", node_id)
    return int(match.group(1)) if match else None


def highest_ordinals(nodes: Sequence[NodeLoad], count: int, prefix: str) -> list[str]:
    """Up to `count` node ids of StatefulSet `prefix`'s pods, highest ordinal first: the
    pods it removes when scaled down by `count`. Stops at a cordoned node (an operator's:
    the StatefulSet would remove it next, so nothing below it may be drained instead)."""
    ranked = sorted(((i, n) for n in nodes if (i := ordinal(n.node_id, prefix)) is not None), key=lambda pair: -pair[0])
    victims: list[str] = []
    for _, node in ranked[: max(0, count)]:
        if node.cordoned:
            break
        victims.append(node.node_id)
    return victims
