"""Hotness-aware placement: rank eligible nodes by the estimated seconds a request would lose there.

Every term is an estimate in seconds times a dimensionless weight, so the terms add up
to something with a meaning (roughly: extra time to first token) and the weights can be
tuned one at a time; a weight of 0 turns its term off. Lower cost ranks first.

    cost = tier     * seconds until the model can run (0 in HBM, switch in DDR, load if cold)
         + queue    * batches of this model's work ahead beyond its batch * batch_turn_seconds
         + occupancy* running / batch size * full_batch_seconds
         + kv       * kv_usage * full_kv_seconds
         + queue    * prompt tokens queued on the node * prefill seconds per token
         + workload * mismatch * workload_mismatch_seconds
         + contention * contention_seconds  (other models of the bundle have work on the node)
         + prefix   * prompt tokens * prefill seconds per token
         - prefix   * leading cached prompt blocks * block size * prefill seconds per token
         - affinity * affinity_seconds              (the node this session used last)

The prefill terms price a prompt where it runs (issue 17): its own prefill, less what the
node's prefix cache saves, plus the prompts queued ahead of it there, each at the
node's seconds per prompt token for the model (`prefill_rate(node, slot)`: the router's
and the simulator's `ModelTable` take it from the emulator's timing model over the
model's shape and the deployment's profile: ~15 us a token for an 8B model on
sn40l-16). In seconds of the same kind as the switch and queue terms, a cached prefix is
worth what it saves and no more, so a long conversation is not pinned to a node whose
queue costs it more than its cache saves, and at low load (nothing queued) the node
holding the prefix wins by exactly the prefill it spares. Without a rate (hardware or
model unknown) a cached block is credited `prefix_block_seconds` and queued prompts are
not priced, as before.

The seconds until the model can run come from the weights' per-tier figures, or from a
`switch_cost(node, slot)` callable given to `HotnessAware` when the caller knows better
(the router's and the simulator's `ModelTable` know each model's size and each profile's
bandwidths). Likewise `batch_turn(model)` replaces `batch_turn_seconds` with the decode
time measured on the model's finished requests.

Scoring is column-wise: the parts of the sum that depend on a node's view alone are rows
of numpy columns (`_Rows`), kept between decisions by `rank_rows` and refreshed only for
nodes whose view changed (`CandidateIndex`); a decision adds the request's terms to all
rows at once. At a few hundred candidates that is ~25 us a decision where a loop over the
nodes took ~1 ms (`loadtest/placement_speed.py`). The sum is taken in the order written
above, term by term, so it equals a per-node loop bit for bit (tests/placement/test_placement_rows.py).
A model served by a few nodes (up to `SMALL_ROWS`) keeps its columns as Python lists and is
scored by a plain loop over them (`_score_small`, the same sum in the same order): numpy's
fixed cost per call (~20 us a decision) is most of the work when there are one to a dozen
rows, which is the common case for a router (issue 16).

Weights are configuration, e.g. in the router's YAML:

    placement:
      policy: hotness
      weights:
        cold_seconds: 12.0     # a slower storage tier than the default assumes
        affinity: 2.0          # agent workflows: stick to a session's node harder
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import compress, repeat
from operator import contains, indexOf
from typing import Annotated, Any, Final

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from tierflow.placement.candidates import ModelCandidates
from tierflow.placement.filters import diagnose, eligible
from tierflow.placement.policy import Choice, Placement, check_limit
from tierflow.placement.request import PlacementRequest
from tierflow.placement.view import ModelSlot, NodeView
from tierflow.rdu.kvcache import DEFAULT_BLOCK_SIZE

__all__ = ["PlacementWeights", "HotnessAware", "SwitchCost", "BatchTurn", "PrefillRate"]

Seconds = Annotated[float, Meta(ge=0.0)]
Weight = Annotated[float, Meta(ge=0.0)]

SwitchCost = Callable[[NodeView, ModelSlot], float]
"""Estimated seconds until `slot`'s model can run on `node` (0 when it is in HBM)."""

PrefillRate = Callable[[NodeView, ModelSlot], "float | None"]
"""Seconds `node` takes to prefill one prompt token of `slot`'s model; None when unknown."""

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

_HOT: Final = frozenset({"hbm", "sram"})  # tiers a model runs from without moving weights
_WORKLOADS: Final = ("bundle", "high-interactivity", "high-throughput")
_WORKLOAD_CODE: Final[Mapping[str, int]] = {w: i for i, w in enumerate(_WORKLOADS)}  # any other class: len(_WORKLOADS)
_PLACE_CODE: dict[str, int] = {}  # region and residency names as small ints, for boundary masks
SMALL_ROWS = 16
RHO_CAP: Final = 0.9
"""The fleet load above which recomputing a prompt costs no more (`_load_factor` at most 10)."""
"""Candidate sets up to this size are scored in plain Python (`_score_small`), larger ones in numpy."""


def _place_code(name: str) -> int:
    code = _PLACE_CODE.get(name)
    if code is None:
        code = _PLACE_CODE[name] = len(_PLACE_CODE)
    return code


class _Rows:
    """The parts of `HotnessAware`'s cost that depend on one node's view alone, one row per
    node, as columns: a decision adds what depends on the request (and on measurements
    that move between decisions) to all rows at once. Rows without the model's slot are
    never eligible (`ok` False)."""

    __slots__ = (
        "generation", "slots", "ok", "stale", "suspect", "region", "residency", "sw", "volatile", "qnum", "qden", "okv", "cont",
        "wl", "hashes", "ptok", "pfx", "occ",
    )  # fmt: skip

    def __init__(self, n: int, *, generation: int) -> None:
        """Columns of `n` rows, all ineligible until filled (see `in_lists` for filling many)."""
        self.generation = generation
        self.slots: list[ModelSlot | None] = [None] * n
        self.ok = np.zeros(n, dtype=bool)  # has the slot, not cordoned or draining
        self.stale = np.zeros(n)  # `NodeView.stale_after`
        self.suspect = np.zeros(n)  # `NodeView.suspect_until`
        self.region = np.zeros(n, dtype=np.intp)  # `_place_code` of the node's region
        self.residency = np.zeros(n, dtype=np.intp)  # ... and of its residency tag
        self.sw = np.zeros(n)  # seconds until the model can run (rows not in `volatile`)
        self.volatile: set[int] = set()  # rows whose switch cost is asked for per decision
        self.qnum = np.zeros(n)  # queue term: kq * qnum / qden
        self.qden = np.ones(n)
        self.okv = np.zeros(n)  # occupancy and KV terms
        self.cont = np.zeros(n)  # contention term (0 or its weight)
        self.wl = np.full(n, len(_WORKLOADS), dtype=np.intp)  # the node's workload class, coded
        self.hashes: list[frozenset[int]] = [frozenset()] * n  # recently cached prompt blocks
        self.ptok = np.zeros(n)  # prefix weight * prefill seconds per prompt token
        self.pfx = np.zeros(n)  # credit per cached prompt block
        self.occ = np.zeros(n)  # occupancy + backlog, at most 1: the load that prices recomputed prompt tokens

    _ARRAYS: Final[Mapping[str, type]] = {
        "ok": np.bool_, "stale": np.float64, "suspect": np.float64, "region": np.intp, "residency": np.intp, "sw": np.float64,
        "qnum": np.float64, "qden": np.float64, "okv": np.float64, "cont": np.float64, "wl": np.intp, "ptok": np.float64,
        "pfx": np.float64, "occ": np.float64,
    }  # fmt: skip

    def in_lists(self) -> None:
        """Hold the columns as lists while every row is filled at once (`rank`): setting a
        numpy element costs ~0.1 us, a list item a third of that, and one conversion at
        the end (`as_arrays`) is cheaper than a dozen numpy writes per row."""
        for name in self._ARRAYS:
            setattr(self, name, getattr(self, name).tolist())

    def as_arrays(self) -> None:
        for name, dtype in self._ARRAYS.items():
            setattr(self, name, np.array(getattr(self, name), dtype=dtype))


def _rows_of(views: Sequence[NodeView], pos: Mapping[str, int] | None, node_ids: Iterable[str]) -> list[int]:
    """The rows of these nodes: by `pos` when given, else by a walk (a list may repeat a node)."""
    if pos is not None:
        return [r for node_id in node_ids if (r := pos.get(node_id)) is not None]
    wanted = set(node_ids)
    return [r for r, view in enumerate(views) if view.node_id in wanted]


def _credit_affinity(cost: Any, views: Sequence[NodeView], pos: Mapping[str, int] | None, affinity_node: str | None, credit: float) -> None:
    """The session's last node costs `credit` less (a list or an array of costs, by row)."""
    if affinity_node is not None:
        for r in _rows_of(views, pos, (affinity_node,)):
            cost[r] -= credit


class HotnessAware:
    """The hotness-aware policy: filter (`filters.eligible`'s rules), then rank by estimated cost.

    Equal costs are broken by a turn that advances each call, so identical idle nodes
    share work instead of the first in the list taking all of it.
    """

    name = "hotness"

    __slots__ = (
        "weights", "_switch_cost", "_batch_turn", "_prefill_rate", "_tier_cost", "_unknown_tier", "_workload_cost", "_workload_rows",
        "_turn", "_k",
    )  # fmt: skip

    def __init__(
        self, weights: PlacementWeights | None = None, *, switch_cost: SwitchCost | None = None, batch_turn: BatchTurn | None = None,
        prefill_rate: PrefillRate | None = None,
    ) -> None:
        w = weights or PlacementWeights()
        self.weights = w
        self._switch_cost = switch_cost
        self._batch_turn = batch_turn
        self._prefill_rate = prefill_rate
        self._tier_cost = {t: w.tier * s for t, s in w.tier_seconds().items()}
        self._unknown_tier = w.tier * w.cold_seconds
        self._workload_cost = {
            pref: {cls: w.workload * w.workload_mismatch_seconds * f for cls, f in row.items()}
            for pref, row in _MISMATCH.items()
        }
        self._workload_rows = {
            pref: np.array([row.get(cls, 0.0) for cls in _WORKLOADS] + [0.0]) for pref, row in self._workload_cost.items()
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
        candidates = eligible(nodes, request, now)  # a one-off list: only the eligible are scored
        if not candidates:
            raise diagnose(nodes, request, now)
        views = [node for node, _ in candidates]
        rows = _Rows(len(views), generation=0)
        rows.in_lists()
        model, version = request.model, request.version
        for r, view in enumerate(views):
            self._fill(rows, r, view, model, version)
        rows.as_arrays()
        cost, eligible_rows, blocks = self._score(rows, views, request, now)
        n = len(eligible_rows)
        turn = self._next_turn()
        ties = (np.arange(n) + turn) % n  # equal costs: the turn decides, so equal nodes share work
        order = eligible_rows[np.lexsort((ties, cost[eligible_rows]))]
        if limit is not None:
            order = order[:limit]
        aff = request.affinity_node
        return Placement(
            policy=self.name,
            choices=tuple(self._choice(views[r], rows.slots[r], float(cost[r]), blocks.get(r, 0), aff) for r in order.tolist()),
            eligible=n,
        )

    def rank_rows(self, candidates: ModelCandidates, request: PlacementRequest, now: float) -> Placement:
        """`rank(candidates.views, request, now, limit=1)`, the same answer at a fraction of
        the cost: the per-row parts of the score are kept between decisions and refreshed
        only for the rows whose view changed since (`CandidateIndex`)."""
        key = (request.model, request.version)
        rows = candidates.columns.get(key)
        views = candidates.views
        if rows is None or rows.generation != candidates.generation:
            rows = candidates.columns[key] = _Rows(len(views), generation=candidates.generation)
            if len(views) <= SMALL_ROWS:
                rows.in_lists()  # and kept so: `_score_small` reads lists
            candidates.dirty[key] = set(range(len(views)))
        dirty = candidates.dirty[key]
        if dirty:
            model, version = key
            for r in dirty:
                self._fill(rows, r, views[r], model, version)
            dirty.clear()
        if type(rows.ok) is list:
            return self._rank_small(rows, views, request, now, candidates.pos)
        cost, eligible_rows, blocks = self._score(rows, views, request, now, candidates.pos)
        n = len(eligible_rows)
        if not n:
            raise diagnose(views, request, now)
        turn = self._next_turn()
        costs = cost[eligible_rows]
        ties = np.flatnonzero(costs == costs.min())
        at = int(ties[0]) if len(ties) == 1 else int(ties[np.argmin((ties + turn) % n)])
        r = int(eligible_rows[at])
        choice = self._choice(views[r], rows.slots[r], float(costs[at]), blocks.get(r, 0), request.affinity_node)
        return Placement(policy=self.name, choices=(choice,), eligible=n)

    def _rank_small(self, rows: _Rows, views: Sequence[NodeView], request: PlacementRequest, now: float, pos: Mapping[str, int]) -> Placement:
        """`rank_rows` over columns held as lists: the same costs, eligibility and tie-break."""
        cost, eligible_rows, blocks = self._score_small(rows, views, request, now, pos)
        n = len(eligible_rows)
        if not n:
            raise diagnose(views, request, now)
        turn = self._next_turn()
        costs = [cost[r] for r in eligible_rows]
        low = min(costs)
        ties = [i for i, c in enumerate(costs) if c == low]
        at = ties[0] if len(ties) == 1 else min(ties, key=lambda i: (i + turn) % n)  # the first of equals, as argmin
        r = eligible_rows[at]
        choice = self._choice(views[r], rows.slots[r], costs[at], blocks.get(r, 0), request.affinity_node)
        return Placement(policy=self.name, choices=(choice,), eligible=n)

    def _score_small(
        self, rows: _Rows, views: Sequence[NodeView], request: PlacementRequest, now: float, pos: Mapping[str, int]
    ) -> tuple[list[float], list[int], dict[int, int]]:
        """`_score` over columns held as lists, one row at a time: each row's sum is taken
        in the same order as the columns' (float64 either way), so the costs are equal."""
        ok, stale, suspect = rows.ok, rows.stale, rows.suspect
        mask = [ok[r] and stale[r] >= now and suspect[r] <= now for r in range(len(ok))]
        boundary = request.boundary
        if boundary.regions is not None:
            codes = {_PLACE_CODE.get(region, -1) for region in boundary.regions}
            region = rows.region
            mask = [m and region[r] in codes for r, m in enumerate(mask)]
        if boundary.residency is not None:
            code = _PLACE_CODE.get(boundary.residency, -1)
            residency = rows.residency
            mask = [m and residency[r] == code for r, m in enumerate(mask)]
        exclude = request.exclude
        if exclude:
            for r in _rows_of(views, pos, exclude):
                mask[r] = False
        eligible_rows = [r for r, m in enumerate(mask) if m]
        if not eligible_rows:
            return list(rows.sw), eligible_rows, {}  # type: ignore[arg-type]
        kq, _, _, _, ka, _ = self._k
        if self._batch_turn is not None:
            measured = self._batch_turn(request.model)
            if measured is not None:
                kq = self.weights.queue * measured
        sw: list[float] = list(rows.sw)  # type: ignore[arg-type]
        if self._switch_cost is not None:
            if rows.volatile:
                switch_cost, slots = self._switch_cost, rows.slots
                for r in rows.volatile:
                    if mask[r]:
                        sw[r] = switch_cost(views[r], slots[r])  # type: ignore[arg-type]
            tier = self.weights.tier
            sw = [tier * x for x in sw]
        qnum, qden, okv, cont = rows.qnum, rows.qden, rows.okv, rows.cont
        wl_cost = self._workload_rows.get(request.workload) if request.workload else None
        if wl_cost is None:
            cost = [sw[r] + kq * qnum[r] / qden[r] + okv[r] + cont[r] for r in range(len(sw))]
        else:
            wl, wl_row = rows.wl, wl_cost.tolist()
            cost = [sw[r] + kq * qnum[r] / qden[r] + okv[r] + cont[r] + wl_row[wl[r]] for r in range(len(sw))]
        occ = rows.occ
        factor = self._load_factor([occ[r] for r in eligible_rows])  # type: ignore[index]
        prompt = request.prompt_tokens * factor
        if prompt:
            ptok = rows.ptok
            cost = [c + prompt * ptok[r] for r, c in enumerate(cost)]
        blocks: dict[int, int] = {}
        probe = request.probe
        first = probe[0]
        hashes, pfx = rows.hashes, rows.pfx
        for r in eligible_rows:
            if first in hashes[r]:
                run = blocks[r] = indexOf(map(hashes[r].__contains__, probe), False)
                cost[r] -= pfx[r] * factor * run
        _credit_affinity(cost, views, pos, request.affinity_node, ka)
        return cost, eligible_rows, blocks

    def _load_factor(self, loads: list[float]) -> float:
        """How much a prompt token computed now costs beyond its own request's time.

        A token recomputed on a node takes that node's time from the requests that queue
        behind it; at utilization rho a request finds about rho / (1 - rho) others waiting
        (M/M/1), so its prefill costs the fleet 1 / (1 - rho) times its own duration. rho
        is the mean load of the eligible nodes (running and queued requests per batch
        slot, at most 1 a node; capped at `RHO_CAP`), so at low
        load a prompt goes where it starts soonest (spreading work) and at high load where
        its prefix is cached (keeping locality). 1 without a prefill rate (the flat credit)."""
        if self._prefill_rate is None or not loads:
            return 1.0
        rho = math.fsum(loads) / len(loads)  # exact, so list and numpy columns agree to the bit
        return 1.0 / (1.0 - min(rho, RHO_CAP))

    def _next_turn(self) -> int:
        self._turn += 1
        return self._turn

    def _fill(self, rows: _Rows, r: int, view: NodeView, model: str, version: str | None) -> None:
        """Row `r`'s parts of the score that depend on the node's view alone."""
        slot = view.slots.get(model) if version is None else view.versions.get((model, version))
        rows.slots[r] = slot
        rows.volatile.discard(r)
        if slot is None:
            rows.ok[r] = False
            rows.hashes[r] = frozenset()
            return
        rows.region[r] = _place_code(view.region)
        rows.residency[r] = _place_code(view.residency)
        rows.ok[r] = not view.blocked
        rows.stale[r] = view.stale_after
        rows.suspect[r] = view.suspect_until
        _, ko, kk, kp, _, kc = self._k
        if self._switch_cost is None:
            rows.sw[r] = self._tier_cost.get(slot.tier, self._unknown_tier)
        elif slot.tier in _HOT:
            rows.sw[r] = self._switch_cost(view, slot)
        else:  # a switch may wait on a victim's measured decode time: priced per decision
            rows.volatile.add(r)
        batch = slot.max_batch
        if batch:  # continuous batching is per model: wait only for this model's batch to have room
            rows.qnum[r], rows.qden[r] = max(0, slot.queued + slot.in_flight + 1 - batch), batch
        else:
            rows.qnum[r], rows.qden[r] = view.backlog, 1.0
        rate = self._prefill_rate(view, slot) if self._prefill_rate is not None else None
        if rate is None:  # hardware or model unknown: a flat credit per cached block, no queue priced
            rows.okv[r] = ko * view.occupancy + kk * view.kv_usage
            rows.ptok[r], rows.pfx[r] = 0.0, kp
        else:
            w = self.weights
            rows.okv[r] = ko * view.occupancy + kk * view.kv_usage + w.queue * view.queued_prompt_tokens * rate
            rows.ptok[r] = w.prefix * rate
            rows.pfx[r] = w.prefix * rate * DEFAULT_BLOCK_SIZE
        rows.occ[r] = min(1.0, view.occupancy + view.backlog)
        rows.cont[r] = kc if view.running + view.queue_depth > slot.in_flight + slot.queued else 0.0  # another model's work
        rows.wl[r] = _WORKLOAD_CODE.get(view.workload, len(_WORKLOADS))
        hashes = slot.prefix_hashes
        if hashes is None:
            hashes = view.prefix_hashes
        rows.hashes[r] = hashes

    def _score(
        self, rows: _Rows, views: Sequence[NodeView], request: PlacementRequest, now: float, pos: Mapping[str, int] | None = None
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp], dict[int, int]]:
        """Every row's cost (the module docstring's sum, in that order), the eligible rows
        (`filters.eligible`'s rules), and the prefix blocks of the rows that have any.
        `pos` (node id -> row) finds a node's row without a walk, when the caller has it."""
        mask = rows.ok & (rows.stale >= now) & (rows.suspect <= now)
        boundary = request.boundary
        if boundary.regions is not None:
            mask &= np.isin(rows.region, [_PLACE_CODE.get(region, -1) for region in boundary.regions])
        if boundary.residency is not None:
            mask &= rows.residency == _PLACE_CODE.get(boundary.residency, -1)
        exclude = request.exclude
        if exclude:
            for r in _rows_of(views, pos, exclude):
                mask[r] = False
        eligible_rows = np.flatnonzero(mask)
        if not len(eligible_rows):
            return rows.sw, eligible_rows, {}
        kq, _, _, _, ka, _ = self._k
        if self._batch_turn is not None:
            measured = self._batch_turn(request.model)  # once per decision: every row serves this model
            if measured is not None:
                kq = self.weights.queue * measured
        if self._switch_cost is None:
            cost = rows.sw.copy()
        else:
            sw = rows.sw
            if rows.volatile:
                sw = sw.copy()
                switch_cost, slots = self._switch_cost, rows.slots
                for r in rows.volatile:
                    if mask[r]:
                        sw[r] = switch_cost(views[r], slots[r])  # type: ignore[arg-type]
            cost = self.weights.tier * sw
        cost += kq * rows.qnum / rows.qden
        cost += rows.okv
        cost += rows.cont
        wl_cost = self._workload_rows.get(request.workload) if request.workload else None
        if wl_cost is not None:
            cost += wl_cost[rows.wl]
        factor = self._load_factor(rows.occ[eligible_rows].tolist())  # one gather, not a numpy scalar per row
        prompt = request.prompt_tokens * factor
        if prompt:
            cost += prompt * rows.ptok
        blocks: dict[int, int] = {}
        probe = request.probe
        first = probe[0]  # END_OF_PROMPT when there is no prompt: in no node's hashes
        hashes, pfx = rows.hashes, rows.pfx
        for r in compress(range(len(hashes)), map(contains, hashes, repeat(first))):  # rows holding the prompt's start
            if mask[r]:  # `policy.prefix_run`, inlined
                run = blocks[r] = indexOf(map(hashes[r].__contains__, probe), False)
                cost[r] -= float(pfx[r]) * factor * run
        _credit_affinity(cost, views, pos, request.affinity_node, ka)
        return cost, eligible_rows, blocks

    def _choice(self, node: NodeView, slot: ModelSlot | None, cost: float, blocks: int, aff: str | None) -> Choice:
        assert slot is not None  # only eligible rows are chosen, and those have a slot
        affinity = node.node_id == aff
        return Choice(
            node_id=node.node_id,
            tier=slot.tier,
            prefix_blocks=blocks,
            affinity=affinity,
            score=cost,
            reason=_REASONS.get((slot.tier, blocks > 0, affinity))
            or f"{slot.tier}{'+prefix' if blocks else ''}{'+affinity' if affinity else ''}",
        )
