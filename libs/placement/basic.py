"""The baseline placement: healthy nodes that serve the model, least loaded first.

Issue-level note: hotness-aware scoring (model tier, prefix overlap, session affinity)
builds on the same `NodeView` and the same filter; this is its baseline for comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["NodeView", "eligible", "rank_least_loaded"]


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node as placement sees it: the last heartbeat, reduced to what scoring needs."""

    node_id: str
    models: frozenset[str]
    tiers: dict[str, str] = field(default_factory=dict)  # model -> "hbm" | "ddr" | "loading" | "cold"
    region: str = "local"
    residency: str = ""
    queue_depth: int = 0
    running: int = 0
    max_batch: int = 0
    last_seen: float = 0.0
    interval_s: float = 1.0
    cordoned: bool = False
    draining: bool = False
    suspect_until: float = 0.0  # the router saw it fail a request; avoid it until then

    def is_live(self, now: float, missed_beats: float = 3.0) -> bool:
        return now - self.last_seen <= missed_beats * self.interval_s

    @property
    def load(self) -> float:
        """Work per batch slot: queued and running requests over the batch size."""
        return (self.queue_depth + self.running) / max(1, self.max_batch)


def eligible(nodes: Iterable[NodeView], model: str, now: float) -> list[NodeView]:
    """Nodes that may take a request for `model` right now."""
    return [
        n for n in nodes
        if model in n.models and n.is_live(now) and not n.cordoned and not n.draining and n.suspect_until <= now
    ]


def rank_least_loaded(nodes: Sequence[NodeView], model: str, now: float, *, turn: int = 0) -> list[str]:
    """Eligible node ids, least loaded first; `turn` rotates ties so equal nodes share work."""
    candidates = eligible(nodes, model, now)
    if not candidates:
        return []
    k = turn % len(candidates)
    rotated = candidates[k:] + candidates[:k]
    return [n.node_id for n in sorted(rotated, key=lambda n: n.load)]
