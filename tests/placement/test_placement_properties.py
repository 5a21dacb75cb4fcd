"""Properties over random fleets: every policy's choices are eligible and inside the boundary."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.contracts import messages
from tierflow.placement import POLICIES, Boundary, NoEligibleNode, NodeView, PlacementRequest, make_policy

REGIONS = ("eu", "us", "ap")
RESIDENCIES = ("", "gdpr")
NOW = 100.0


@st.composite
def nodes(draw: st.DrawFn, index: int) -> NodeView:
    models = draw(st.lists(st.sampled_from(("m", "x")), min_size=1, max_size=2, unique=True))
    hb = messages.NodeHeartbeat(
        node_id=f"n{index}",
        region=draw(st.sampled_from(REGIONS)),
        residency=draw(st.sampled_from(RESIDENCIES)),
        models=[
            messages.ModelState(name=m, version=draw(st.sampled_from(("v1", "v2"))), tier=draw(st.sampled_from(("hbm", "ddr", "loading", "cold"))))
            for m in models
        ],
        queue_depth=draw(st.integers(0, 50)),
        running=draw(st.integers(0, 8)),
        max_batch=draw(st.integers(0, 8)),
        kv_usage=draw(st.floats(0.0, 1.0)),
        recent_prefix_hashes=draw(st.lists(st.integers(0, 12), max_size=8)),
        cordoned=draw(st.booleans()),
        draining=draw(st.booleans()),
        interval_s=1.0,
    )
    seen = draw(st.floats(90.0, 100.0))
    suspect = draw(st.sampled_from((0.0, 99.0, 101.0)))
    workload = draw(st.sampled_from(("bundle", "high-interactivity", "high-throughput")))
    return NodeView.from_heartbeat(hb, seen, workload=workload, suspect_until=suspect)


fleets = st.integers(0, 12).flatmap(lambda n: st.tuples(*(nodes(i) for i in range(n))))
boundaries = st.builds(
    Boundary,
    regions=st.none() | st.frozensets(st.sampled_from(REGIONS), min_size=1),
    residency=st.none() | st.sampled_from(RESIDENCIES),
)
requests = st.builds(
    PlacementRequest,
    model=st.sampled_from(("m", "x")),
    version=st.none() | st.sampled_from(("v1", "v2")),
    prompt_hashes=st.lists(st.integers(0, 12), max_size=6),
    affinity_node=st.none() | st.sampled_from(("n0", "n1", "n2")),
    boundary=boundaries,
    workload=st.none() | st.sampled_from(("interactive", "batch")),
    exclude=st.frozensets(st.sampled_from(("n0", "n1", "n2")), max_size=2),
)


def _admissible(node: NodeView, request: PlacementRequest) -> bool:
    b = request.boundary
    return (
        node.is_live(NOW)
        and not node.cordoned
        and not node.draining
        and node.suspect_until <= NOW
        and (b.regions is None or node.region in b.regions)
        and (b.residency is None or node.residency == b.residency)
        and node.slot(request.model, request.version) is not None
        and node.node_id not in request.exclude
    )


@settings(max_examples=300, deadline=None)
@given(fleet=fleets, request=requests, policy_name=st.sampled_from(sorted(POLICIES)), limit=st.none() | st.integers(1, 4))
def test_every_choice_is_eligible_and_inside_the_boundary(
    fleet: tuple[NodeView, ...], request: PlacementRequest, policy_name: str, limit: int | None
) -> None:
    admissible = {n.node_id for n in fleet if _admissible(n, request)}
    policy = make_policy(policy_name, seed=0)
    try:
        placement = policy.rank(list(fleet), request, NOW, limit=limit)
    except NoEligibleNode as exc:
        assert not admissible, f"{exc.reason} but {admissible} could serve"
        if not request.boundary.unbounded and exc.code in ("outside_boundary", "unavailable"):
            assert request.boundary.describe() in exc.reason
        return
    ids = placement.node_ids
    assert ids and set(ids) <= admissible and len(ids) == len(set(ids))
    assert placement.eligible == len(admissible)
    assert len(ids) == (len(admissible) if limit is None else min(limit, len(admissible)))
    by_id = {n.node_id: n for n in fleet}
    for choice in placement.choices:
        slot = by_id[choice.node_id].slot(request.model, request.version)
        assert slot is not None and choice.tier == slot.tier


@settings(max_examples=200, deadline=None)
@given(fleet=fleets, request=requests)
def test_hotness_ranks_in_score_order_and_limit_is_a_prefix(fleet: tuple[NodeView, ...], request: PlacementRequest) -> None:
    from tierflow.placement import HotnessAware

    try:
        full = HotnessAware().rank(list(fleet), request, NOW)
    except NoEligibleNode:
        return
    scores = [c.score for c in full.choices]
    assert scores == sorted(scores)
    top = HotnessAware().rank(list(fleet), request, NOW, limit=2)
    assert [c.score for c in top.choices] == scores[:2]
