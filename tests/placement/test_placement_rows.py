"""Column-wise scoring gives the answers of the plain per-node loop, bit for bit.

`HotnessAware.rank` and `rank_rows` score with numpy columns (`scoring._Rows`), and
`CandidateIndex` keeps those columns current from the node table's changes. The reference
here is the per-node loop the policy used before (the module docstring's sum, one node
at a time): every ranking, score and tie-break must equal it, over random fleets and
over random sequences of heartbeats, dispatches, failures and forgotten nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from operator import indexOf

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_placement_properties import NOW, fleets, nodes, requests
from tierflow.contracts import messages
from tierflow.placement import scoring
from tierflow.placement import ANYWHERE, HotnessAware, NoEligibleNode, NodeView, PlacementRequest, PlacementWeights
from tierflow.placement.candidates import CandidateIndex, ModelCandidates
from tierflow.placement.filters import eligible
from tierflow.placement.tables import NodeTable
from tierflow.placement.view import ModelSlot


class _Measured:
    """A switch cost and a batch turn that move between decisions, as measured ones do."""

    def __init__(self) -> None:
        self.drain = 1.5
        self.turn: float | None = None

    def switch_cost(self, node: NodeView, slot: ModelSlot) -> float:
        base = {"hbm": 0.0, "sram": 0.0, "ddr": 0.3, "loading": 0.7, "cold": 9.0}.get(slot.tier, 9.0)
        if slot.tier in ("hbm", "sram"):
            return base
        busy = sum(s.in_flight + s.queued for s in node.slots.values() if s.name != slot.name)
        return base + self.drain * busy / 3

    def batch_turn(self, model: str) -> float | None:
        return self.turn

    def prefill_rate(self, node: NodeView, slot: ModelSlot) -> float | None:
        """Seconds per prompt token: differs by node (hardware), unknown for model "x"."""
        return None if slot.name == "x" else 1.5e-5 * (1 + len(node.node_id) % 3)


def reference(policy: HotnessAware, measured: _Measured | None, nodes: Sequence[NodeView], request: PlacementRequest, turn: int) -> list[tuple[str, float, int]]:
    """(node, score, prefix blocks), best first: the per-node loop, with the policy's turn."""
    w = policy.weights
    candidates = eligible(nodes, request, NOW)
    n = len(candidates)
    kq = w.queue * w.batch_turn_seconds
    if measured is not None and measured.turn is not None:
        kq = w.queue * measured.turn
    tier_cost = {t: w.tier * s for t, s in w.tier_seconds().items()}
    mismatch = {"interactive": {"high-interactivity": 0.0, "bundle": 0.5, "high-throughput": 1.0},
                "batch": {"high-throughput": 0.0, "bundle": 0.5, "high-interactivity": 1.0}}  # fmt: skip
    probe = request.probe
    scored = []
    prefill = policy._prefill_rate
    factor = 1.0  # the load factor: 1 / (1 - mean occupancy of the eligible nodes, capped)
    if prefill is not None and candidates:
        factor = 1.0 / (1.0 - min(math.fsum(min(1.0, node.occupancy + node.backlog) for node, _ in candidates) / n, scoring.RHO_CAP))
    for i, (node, slot) in enumerate(candidates):
        rate = prefill(node, slot) if prefill is not None else None
        cost = w.tier * measured.switch_cost(node, slot) if measured is not None else tier_cost.get(slot.tier, w.tier * w.cold_seconds)
        batch = slot.max_batch
        if batch:
            cost += kq * max(0, slot.queued + slot.in_flight + 1 - batch) / batch
        else:
            cost += kq * node.backlog
        if rate is None:
            cost += w.occupancy * w.full_batch_seconds * node.occupancy + w.kv * w.full_kv_seconds * node.kv_usage
        else:  # the prompts queued on the node, priced at its rate
            cost += w.occupancy * w.full_batch_seconds * node.occupancy + w.kv * w.full_kv_seconds * node.kv_usage + w.queue * node.queued_prompt_tokens * rate
        if node.running + node.queue_depth > slot.in_flight + slot.queued:
            cost += w.contention * w.contention_seconds
        if request.workload:
            cost += w.workload * w.workload_mismatch_seconds * mismatch[request.workload].get(node.workload, 0.0)
        if rate is not None and request.prompt_tokens:
            cost += (request.prompt_tokens * factor) * (w.prefix * rate)  # the prompt's own prefill there
        hashes = slot.prefix_hashes if slot.prefix_hashes is not None else node.prefix_hashes
        blocks = 0
        if probe[0] in hashes:
            blocks = indexOf(map(hashes.__contains__, probe), False)
            cost -= (w.prefix * w.prefix_block_seconds if rate is None else w.prefix * rate * 64) * factor * blocks
        if request.affinity_node is not None and node.node_id == request.affinity_node:
            cost -= w.affinity * w.affinity_seconds
        scored.append((cost, (i + turn) % n, blocks, node.node_id))
    return [(node_id, cost, blocks) for cost, _, blocks, node_id in sorted(scored)]


def _policy(w: PlacementWeights, measured: _Measured | None) -> HotnessAware:
    if measured is None:
        return HotnessAware(w)
    return HotnessAware(w, switch_cost=measured.switch_cost, batch_turn=measured.batch_turn, prefill_rate=measured.prefill_rate)


# Requests with a prompt length (priced where a rate is known) or without one, and fleets
# whose nodes have prompts queued: the prefill terms of the sum.
def _with_prompt(request: PlacementRequest, tokens: int) -> PlacementRequest:
    return replace(request, prompt_tokens=tokens)


def _with_queue(fleet: tuple[NodeView, ...], queued: list[int]) -> tuple[NodeView, ...]:
    return tuple(replace(v, queued_prompt_tokens=q) for v, q in zip(fleet, queued + [0] * len(fleet), strict=False))


def _ranked(placement: object) -> list[tuple[str, float, int]]:
    return [(c.node_id, c.score, c.prefix_blocks) for c in placement.choices]  # type: ignore[attr-defined]


weights = st.builds(
    PlacementWeights,
    queue=st.sampled_from((0.0, 1.0, 2.5)),
    prefix=st.sampled_from((0.0, 1.0, 40.0)),
    affinity=st.sampled_from((1.0, 30.0)),
    contention=st.sampled_from((0.0, 1.0)),
)


@settings(max_examples=300, deadline=None)
@given(fleet=fleets, request=requests, w=weights, measure=st.booleans(), turn=st.sampled_from((None, 0.05, 3.0)),
       prompt=st.sampled_from((0, 1, 700, 50_000)), queued=st.lists(st.sampled_from((0, 0, 300, 90_000)), max_size=12))
def test_rank_equals_the_per_node_loop(
    fleet: tuple[NodeView, ...], request: PlacementRequest, w: PlacementWeights, measure: bool, turn: float | None, prompt: int, queued: list[int]
) -> None:
    fleet, request = _with_queue(fleet, queued), _with_prompt(request, prompt)
    measured = _Measured() if measure else None
    if measured is not None:
        measured.turn = turn
    policy = _policy(w, measured)
    policy._turn = 6  # the next decision's turn is 7
    try:
        got = _ranked(policy.rank(fleet, request, NOW))
    except NoEligibleNode:
        assert not eligible(fleet, request, NOW)
        return
    assert got == reference(policy, measured, fleet, request, 7)


def _open(view: NodeView, keep: bool) -> NodeView:
    return view if keep else replace(view, cordoned=False, draining=False, suspect_until=0.0, last_seen=NOW - 0.5)


# Fleets where most nodes take work (the shared strategy blocks three in four), some of
# them identical but for their id (ties), and requests mostly without a boundary: so that
# most examples end in a decision rather than NoEligibleNode.
open_fleets = st.one_of(
    st.tuples(fleets, st.lists(st.booleans(), min_size=12, max_size=12)).map(lambda f: tuple(_open(v, k and i % 3 == 0) for i, (v, k) in enumerate(zip(f[0], f[1], strict=False)))),
    st.tuples(nodes(0), st.integers(1, 6)).map(lambda f: tuple(replace(_open(f[0], False), node_id=f"n{i}") for i in range(f[1]))),
)
open_requests = st.tuples(requests, st.booleans()).map(lambda r: replace(r[0], boundary=ANYWHERE) if r[1] else r[0])


@pytest.mark.parametrize("small_rows", [scoring.SMALL_ROWS, 0], ids=["python-loop", "numpy"])
@settings(max_examples=300, deadline=None)
@given(fleet=open_fleets, request=open_requests, w=weights, measure=st.booleans(), turn=st.sampled_from((None, 0.05, 3.0)),
       prompt=st.sampled_from((0, 1, 700, 50_000)), queued=st.lists(st.sampled_from((0, 0, 300, 90_000)), max_size=12))
def test_rank_rows_equals_the_per_node_loop(
    small_rows: int, fleet: tuple[NodeView, ...], request: PlacementRequest, w: PlacementWeights, measure: bool, turn: float | None,
    prompt: int, queued: list[int],
) -> None:
    """The index's decision, from columns held as lists (a few rows) or as numpy arrays, is
    the loop's best node with its score and prefix blocks."""
    fleet, request = _with_queue(fleet, queued), _with_prompt(request, prompt)
    measured = _Measured() if measure else None
    if measured is not None:
        measured.turn = turn
    policy = _policy(w, measured)
    policy._turn = 6  # the next decision's turn is 7
    candidates = ModelCandidates(request.model)
    for ordinal, view in enumerate(fleet):
        if request.model in view.slots:
            candidates._add(view, ordinal)
    default, scoring.SMALL_ROWS = scoring.SMALL_ROWS, small_rows
    try:
        got = policy.rank_rows(candidates, request, NOW)
    except NoEligibleNode:
        assert not eligible(fleet, request, NOW)
        return
    finally:
        scoring.SMALL_ROWS = default
    expected = reference(policy, measured, list(candidates.views), request, 7)
    assert _ranked(got) == expected[:1] and got.eligible == len(expected)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, object]]:
    """Heartbeats (new and repeated nodes), dispatches, failures, forgetting, and decisions."""
    steps: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(("beat", "beat", "dispatch", "suspect", "forget", "decide", "decide", "drain")))
        if kind == "beat":
            index = draw(st.integers(0, 7))
            steps.append((kind, draw(nodes(index))))
        elif kind in ("dispatch", "suspect"):
            steps.append((kind, (f"n{draw(st.integers(0, 7))}", draw(st.sampled_from(("m", "x"))))))
        elif kind == "decide":
            steps.append((kind, draw(requests)))
        elif kind == "drain":
            steps.append((kind, draw(st.floats(0.1, 5.0))))
        else:
            steps.append((kind, draw(st.floats(95.0, 140.0))))
    return steps


def _heartbeat(view: NodeView) -> messages.NodeHeartbeat:
    """The heartbeat a view came from (the strategy draws views)."""
    return messages.NodeHeartbeat(
        node_id=view.node_id, region=view.region, residency=view.residency,
        models=[messages.ModelState(name=s.name, version=s.version, tier=s.tier, in_flight=s.in_flight, queued=s.queued,  # type: ignore[arg-type]
                                    max_batch=s.max_batch) for s in view.versions.values()],
        queue_depth=view.queue_depth, running=view.running, max_batch=view.max_batch, kv_usage=view.kv_usage,
        recent_prefix_hashes=sorted(view.prefix_hashes), queued_prompt_tokens=view.queued_prompt_tokens, cordoned=view.cordoned, draining=view.draining, interval_s=1.0,
    )  # fmt: skip


@pytest.mark.parametrize("small_rows", [scoring.SMALL_ROWS, 0], ids=["python-loop", "numpy"])
@settings(max_examples=200, deadline=None)
@given(history=histories())
def test_the_index_follows_every_change_of_the_table(small_rows: int, history: list[tuple[str, object]]) -> None:
    """Decisions through `CandidateIndex` equal `rank(..., limit=1)` over a fresh `FleetIndex`,
    whether the index scores its few rows in a Python loop or in numpy columns."""
    default, scoring.SMALL_ROWS = scoring.SMALL_ROWS, small_rows
    try:
        _follow(history)
    finally:
        scoring.SMALL_ROWS = default


def _follow(history: list[tuple[str, object]]) -> None:
    table = NodeTable()
    measured = _Measured()
    measured.turn = 0.4
    with_rows, plain = (_policy(PlacementWeights(), measured) for _ in range(2))
    index = CandidateIndex(table)
    for kind, arg in history:
        if kind == "beat":
            assert isinstance(arg, NodeView)
            table.apply(_heartbeat(arg), arg.last_seen, workload=arg.workload)
        elif kind == "dispatch":
            node_id, model = arg  # type: ignore[misc]
            table.note_dispatch(node_id, model, evicts=("x",) if model == "m" else (), prompt_tokens=900)
        elif kind == "suspect":
            table.mark_suspect(arg[0], NOW - 1.0)  # type: ignore[index]
        elif kind == "forget":
            table.forget_dead(arg, after_beats=3.0)  # type: ignore[arg-type]
        elif kind == "drain":
            measured.drain = arg  # type: ignore[assignment]
        else:
            assert isinstance(arg, PlacementRequest)
            serving = table.index().serving(arg.model)
            try:
                expected = plain.rank(serving, arg, NOW, limit=1)
            except NoEligibleNode as none:
                with pytest.raises(NoEligibleNode) as raised:
                    index.rank(with_rows, arg, NOW)
                assert raised.value.code == none.code and raised.value.reason == none.reason
                continue
            got = index.rank(with_rows, arg, NOW)
            assert _ranked(got) == _ranked(expected) and got.eligible == expected.eligible
        for model in ("m", "x"):  # the rows are the index's nodes, in its order
            assert [v.node_id for v in index.serving(model).views] == [v.node_id for v in table.index().serving(model)]
            assert index.serving(model).views == list(table.index().serving(model))


def test_a_dispatch_predicts_slots_field_for_field() -> None:
    """`note_dispatch` builds its predicted slots directly (for speed): every other field
    of a slot must come through unchanged, as `dataclasses.replace` would carry it."""
    from dataclasses import replace

    hb = messages.NodeHeartbeat(
        node_id="n", models=[
            messages.ModelState(name="m", version="v1", tier="ddr", in_flight=2, queued=3, max_batch=4, recent_prefix_hashes=[7, 8]),  # type: ignore[arg-type]
            messages.ModelState(name="x", version="v2", tier="hbm", in_flight=0, queued=0, max_batch=2, recent_prefix_hashes=[9]),  # type: ignore[arg-type]
        ], interval_s=1.0,
    )  # fmt: skip
    table = NodeTable()
    table.apply(hb, 0.0)
    before = table.get("n")
    assert before is not None
    table.note_dispatch("n", "m", evicts=("x",))
    after = table.get("n")
    assert after is not None
    assert after.slots["m"] == replace(before.slots["m"], tier="hbm", queued=4)
    assert after.slots["x"] == replace(before.slots["x"], tier="ddr")
    assert after.versions == {("m", "v1"): after.slots["m"], ("x", "v2"): after.slots["x"]}
    # The view itself is built by copying (for speed): every field, derived ones included,
    # is what `dataclasses.replace` would make, for a model it serves and one it does not.
    table.note_dispatch("n", "absent")
    for got, want in ((after, replace(before, queue_depth=1, slots=after.slots, versions=after.versions)), (table.get("n"), replace(after, queue_depth=2))):
        assert got is not None
        assert {f: getattr(got, f) for f in NodeView.__slots__} == {f: getattr(want, f) for f in NodeView.__slots__}
