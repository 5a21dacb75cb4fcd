"""The one interface every placement policy implements, and what a decision returns.

A policy ranks the eligible nodes best-first. The router tries the first and, if it
fails before its first token, either the next one or a fresh ranking with the failed
node in `PlacementRequest.exclude`. When nothing is eligible, `rank` raises
`NoEligibleNode` (see `filters`), whose message the router sends with its 503.

Each `Choice` carries a low-cardinality `reason` (a metric label: "routing decisions by
reason") and the numbers behind it for the request record (`detail`).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import indexOf as _index_of
from typing import Protocol

import msgspec

from tierflow.placement.request import PlacementRequest
from tierflow.placement.view import ModelSlot, NodeView

__all__ = ["Choice", "Placement", "PlacementPolicy", "prefix_run", "check_limit"]


class Choice(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One ranked node and why it ranks where it does. (A Struct, not a dataclass: a
    decision may build hundreds, and a Struct is built an order of magnitude faster.)

    - `tier`: where the model is on the node, as of its last heartbeat.
    - `prefix_blocks`: the leading prompt blocks the node recently cached.
    - `affinity`: the node is the one this session used last.
    - `score`: the policy's sort key, lower is better (seconds of estimated cost for
      `HotnessAware`; see each policy).
    - `reason`: e.g. "hbm+prefix+affinity" (hotness) or "round-robin" (baselines).
    """

    node_id: str
    tier: str
    prefix_blocks: int
    affinity: bool
    score: float
    reason: str

    @property
    def detail(self) -> str:
        """The reason with its numbers, for the request record: "hbm+prefix(12 blocks)+affinity"."""
        if self.prefix_blocks and "prefix" in self.reason:
            return self.reason.replace("prefix", f"prefix({self.prefix_blocks} blocks)", 1)
        return self.reason


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """A ranking: `choices` best-first (at most the `limit` asked for), out of `eligible` nodes."""

    policy: str
    choices: tuple[Choice, ...]
    eligible: int

    @property
    def best(self) -> Choice:
        return self.choices[0]

    @property
    def node_ids(self) -> list[str]:
        return [c.node_id for c in self.choices]


class PlacementPolicy(Protocol):
    """Rank the nodes that may take `request`; raise `NoEligibleNode` when none may.

    `nodes` may be the whole fleet or, cheaper, `FleetIndex.serving(request.model)`.
    `limit` caps how many choices are built (None: all eligible nodes); asking for the
    few the router will actually try keeps a decision O(candidates) with a small constant.
    Policies that keep state (a round-robin turn, a random generator) keep it per
    instance: one instance per router or simulation run.
    """

    name: str

    def rank(
        self, nodes: Sequence[NodeView], request: PlacementRequest, now: float, *, limit: int | None = None
    ) -> Placement: ...


def prefix_run(node: NodeView, slot: ModelSlot, request: PlacementRequest) -> int:
    """How many of the request's leading prompt blocks the node has recently cached for
    the slot's model (or for any model, when the node reports only one set).

    A prefix cache serves only the common prefix (block i's hash chains block i-1's), so
    the count stops at the first block the node lacks. The walk runs in C: `indexOf`
    finds the first miss, and the sentinel at the end of `request.probe` guarantees one.
    """
    probe = request.probe
    hashes = slot.prefix_hashes
    if hashes is None:
        hashes = node.prefix_hashes
    if probe[0] not in hashes:  # also when there is no prompt: the sentinel is in no set
        return 0
    return _index_of(map(hashes.__contains__, probe), False)



def check_limit(limit: int | None) -> None:
    """`limit` is None (every eligible node) or at least 1: a ranking is never empty."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")
