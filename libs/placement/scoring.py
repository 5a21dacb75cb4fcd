"""Hotness-aware placement: rank eligible nodes by the estimated seconds a request would lose there.

Every term is an estimate in seconds times a dimensionless weight, so the terms add up
to something with a meaning (roughly: extra time to first token) and the weights can be
tuned one at a time; a weight of 0 turns its term off. Lower cost ranks first.

    cost = tier     * seconds until the model can run (0 in HBM, switch in DDR, load if cold)
         + queue    * batches of this model's work ahead beyond its batch * batch_turn_seconds
         + occupancy* running / batch size * full_batch_seconds
         + kv       * kv_usage * full_kv_seconds
         + workload * mismatch * workload_mismatch_seconds
         + contention * contention_seconds  (other models of the bundle have work on the node)
         - prefix   * leading cached prompt blocks * prefix_block_seconds
         - affinity * affinity_seconds              (the node this session used last)

The seconds until the model can run come from the weights' per-tier figures, or from a
`switch_cost(node, slot)` callable given to `HotnessAware` when the caller knows better
(the router's and the simulator's `ModelTable` know each model's size and each profile's
bandwidths). Likewise `batch_turn(model)` replaces `batch_turn_seconds` with the decode
time measured on the model's finished requests.

Weights are configuration, e.g. in the router's YAML:

    placement:
      policy: hotness
      weights:
        cold_seconds: 12.0     # a slower storage tier than the default assumes
        affinity: 2.0          # agent workflows: stick to a session's node harder
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from heapq import nsmallest
from operator import indexOf
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from tierflow.placement.filters import diagnose, eligible
from tierflow.placement.policy import Choice, Placement, check_limit
from tierflow.placement.request import PlacementRequest
from tierflow.placement.view import ModelSlot, NodeView

__all__ = ["PlacementWeights", "HotnessAware", "SwitchCost", "BatchTurn"]

Seconds = Annotated[float, Meta(ge=0.0)]
Weight = Annotated[float, Meta(ge=0.0)]

SwitchCost = Callable[[NodeView, ModelSlot], float]
"""Estimated seconds until `slot`'s model can run on `node` (0 when it is in HBM)."""

BatchTurn = Callable[[str], "float | None"]
"""Measured seconds a request of the model waits per batch of work ahead of it (about one
request's decode); None when unknown, and `PlacementWeights.batch_turn_seconds` applies."""


class PlacementWeights(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Estimates (seconds) and weights (dimensionless) of the hotness-aware score.

    The estimates' defaults follow the emulator's calibration (sn40l-16): a 70B model
    switches DDR -> HBM at ~1 TB/s in ~0.15 s and loads from storage at ~25 GB/s in ~6 s;
    a 64-token block prefills in a few milliseconds.
    """

    # -- estimates, seconds
    hbm_seconds: Seconds = 0.0
    ddr_seconds: Seconds = 0.2  # DDR -> HBM switch
    loading_seconds: Seconds = 0.5  # a load under way; it may still be streaming from storage
    cold_seconds: Seconds = 6.0  # storage -> DDR -> HBM
    batch_turn_seconds: Seconds = 2.0  # a queue one batch deep waits about one request's decode
    full_batch_seconds: Seconds = 0.2  # a full batch decodes slower than an empty one
    full_kv_seconds: Seconds = 0.5  # at 100 % KV usage a request may wait for blocks to free
    prefix_block_seconds: Seconds = 0.005  # prefill saved per cached prompt block
    # Warm state a heartbeat does not show (KV beyond the recent list). Kept small: the
    # prefix term already rewards a session's cached history, and a large bonus pins a
    # session to a node that must switch models for every step of a multi-model flow.
    affinity_seconds: Seconds = 0.1
    workload_mismatch_seconds: Seconds = 2.0  # interactive on high-throughput or batch on high-interactivity
    # A node runs one model's batch at a time: a request for a model while another model
    # of the bundle has work there waits for that model's turn and, when HBM is short,
    # for the weights to be switched back and forth. About one switch of a large model.
    contention_seconds: Seconds = 0.3
    # -- weights
    tier: Weight = 1.0
    queue: Weight = 1.0
    occupancy: Weight = 1.0
    kv: Weight = 1.0
    prefix: Weight = 1.0
    affinity: Weight = 1.0
    workload: Weight = 1.0
    contention: Weight = 1.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> PlacementWeights:
        """Weights from a configuration mapping; unknown keys and negative values are errors."""
        try:
            return msgspec.convert(dict(config or {}), cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid placement weights: {exc}") from None

    def tier_seconds(self) -> dict[str, float]:
        return {
            "sram": self.hbm_seconds,
            "hbm": self.hbm_seconds,
            "ddr": self.ddr_seconds,
            "loading": self.loading_seconds,
            "cold": self.cold_seconds,
        }


# How far a deployment class is from what a request prefers (0 = the right one). A bundle
# serves both kinds, so it sits halfway.
_MISMATCH: Final[Mapping[str, Mapping[str, float]]] = {
    "interactive": {"high-interactivity": 0.0, "bundle": 0.5, "high-throughput": 1.0},
    "batch": {"high-throughput": 0.0, "bundle": 0.5, "high-interactivity": 1.0},
}
_TIERS: Final = ("sram", "hbm", "ddr", "loading", "cold")
# Reasons are metric labels: build every one once, never per decision.
_REASONS: Final[Mapping[tuple[str, bool, bool], str]] = {
    (t, p, a): t + ("+prefix" if p else "") + ("+affinity" if a else "")
    for t in _TIERS
    for p in (False, True)
    for a in (False, True)
}


class HotnessAware:
    """The hotness-aware policy: filter (`filters.eligible`), then rank by estimated cost.

    Equal costs are broken by a turn that advances each call, so identical idle nodes
    share work instead of the first in the list taking all of it.
    """

    name = "hotness"

    __slots__ = ("weights", "_switch_cost", "_batch_turn", "_tier_cost", "_unknown_tier", "_workload_cost", "_turn", "_k")

    def __init__(
        self, weights: PlacementWeights | None = None, *, switch_cost: SwitchCost | None = None, batch_turn: BatchTurn | None = None
    ) -> None:
        w = weights or PlacementWeights()
        self.weights = w
        self._switch_cost = switch_cost
        self._batch_turn = batch_turn
        self._tier_cost = {t: w.tier * s for t, s in w.tier_seconds().items()}
        self._unknown_tier = w.tier * w.cold_seconds
        self._workload_cost = {
            pref: {cls: w.workload * w.workload_mismatch_seconds * f for cls, f in row.items()}
            for pref, row in _MISMATCH.items()
        }
        # queue, occupancy, kv, prefix, affinity: one multiply each per candidate
        self._k = (
            w.queue * w.batch_turn_seconds,
            w.occupancy * w.full_batch_seconds,
            w.kv * w.full_kv_seconds,
            w.prefix * w.prefix_block_seconds,
            w.affinity * w.affinity_seconds,
            w.contention * w.contention_seconds,
        )
        self._turn = 0

    def rank(
        self, nodes: Sequence[NodeView], request: PlacementRequest, now: float, *, limit: int | None = None
    ) -> Placement:
        check_limit(limit)
        candidates = eligible(nodes, request, now)
        n = len(candidates)
        if not n:
            raise diagnose(nodes, request, now)
        kq, ko, kk, kp, ka, kc = self._k
        if self._batch_turn is not None:
            measured = self._batch_turn(request.model)  # once per decision: every candidate serves this model
            if measured is not None:
                kq = self.weights.queue * measured
        tier_cost, unknown, switch_cost = self._tier_cost, self._unknown_tier, self._switch_cost
        tier_w = self.weights.tier
        wl_cost = self._workload_cost.get(request.workload) if request.workload else None
        probe = request.probe
        first = probe[0]  # END_OF_PROMPT when there is no prompt: in no node's hashes
        aff = request.affinity_node
        self._turn += 1
        turn = self._turn
        scored = []
        for i, (node, slot) in enumerate(candidates):
            if switch_cost is None:
                cost = tier_cost.get(slot.tier, unknown)
            else:
                cost = tier_w * switch_cost(node, slot)
            batch = slot.max_batch
            if batch:  # continuous batching is per model: wait only for this model's batch to have room
                cost += kq * max(0, slot.queued + slot.in_flight + 1 - batch) / batch
            else:
                cost += kq * node.backlog
            cost += ko * node.occupancy + kk * node.kv_usage
            if node.running + node.queue_depth > slot.in_flight + slot.queued:
                cost += kc  # another model of the bundle has work here
            if wl_cost is not None:
                cost += wl_cost.get(node.workload, 0.0)
            blocks = 0
            hashes = slot.prefix_hashes
            if hashes is None:
                hashes = node.prefix_hashes
            if first in hashes:  # `policy.prefix_run`, inlined: this loop is the hot path
                blocks = indexOf(map(hashes.__contains__, probe), False)
                cost -= kp * blocks
            if aff is not None and node.node_id == aff:
                cost -= ka
            scored.append((cost, (i + turn) % n, blocks, node, slot))
        top = nsmallest(limit, scored) if limit is not None and limit < n else sorted(scored)
        return Placement(
            policy=self.name,
            choices=tuple(
                Choice(
                    node_id=node.node_id,
                    tier=slot.tier,
                    prefix_blocks=blocks,
                    affinity=node.node_id == aff,
                    score=cost,
                    reason=_REASONS.get((slot.tier, blocks > 0, node.node_id == aff))
                    or f"{slot.tier}{'+prefix' if blocks else ''}{'+affinity' if node.node_id == aff else ''}",
                )
                for cost, _, blocks, node, slot in top
            ),
            eligible=n,
        )
