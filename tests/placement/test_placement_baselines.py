"""Baselines (round-robin, least-loaded, random) and picking a policy by name."""

from __future__ import annotations

import pytest

from tierflow.contracts import messages
from tierflow.placement import (
    POLICIES,
    HotnessAware,
    LeastLoaded,
    NodeView,
    PlacementConfig,
    PlacementRequest,
    Random,
    RoundRobin,
    make_policy,
)

REQ = PlacementRequest(model="m")


def _node(node_id: str, *, queue: int = 0, running: int = 0, tier: str = "hbm") -> NodeView:
    hb = messages.NodeHeartbeat(
        node_id=node_id, models=[messages.ModelState(name="m", tier=tier)],  # type: ignore[arg-type]
        queue_depth=queue, running=running, max_batch=4,
    )
    return NodeView.from_heartbeat(hb, 0.0)


DRAINING = NodeView.from_heartbeat(messages.NodeHeartbeat(node_id="down", models=[messages.ModelState(name="m")], draining=True), 0.0)
NODES = [_node("a", queue=3), _node("b", tier="cold"), _node("c", running=1), DRAINING]


def test_round_robin_cycles_through_eligible_nodes() -> None:
    rr = RoundRobin()
    firsts = [rr.rank(NODES, REQ, 0.0).best.node_id for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    placement = rr.rank(NODES, REQ, 0.0)
    assert placement.node_ids == ["a", "b", "c"] and placement.best.reason == "round-robin"


def test_least_loaded_orders_by_load_and_ignores_tier() -> None:
    placement = LeastLoaded().rank(NODES, REQ, 0.0)
    assert placement.node_ids == ["b", "c", "a"]  # b is cold but idle: a baseline does not care
    assert [c.score for c in placement.choices] == [0.0, 0.25, 0.75]
    assert placement.best.tier == "cold"


def test_random_is_seeded_per_instance() -> None:
    one, two = Random(7), Random(7)
    assert [one.rank(NODES, REQ, 0.0).node_ids for _ in range(5)] == [two.rank(NODES, REQ, 0.0).node_ids for _ in range(5)]
    rnd = Random(7)
    seen = {rnd.rank(NODES, REQ, 0.0, limit=1).best.node_id for _ in range(50)}
    assert seen == {"a", "b", "c"}
    assert sorted(Random(1).rank(NODES, REQ, 0.0).node_ids) == ["a", "b", "c"]


def test_policy_state_is_per_instance() -> None:
    first, second = RoundRobin(), RoundRobin()
    first.rank(NODES, REQ, 0.0)
    assert second.rank(NODES, REQ, 0.0).best.node_id == "a"


def test_baselines_still_report_prefix_and_affinity_for_the_record() -> None:
    hashes = [11, 22]
    hb = messages.NodeHeartbeat(node_id="p", models=[messages.ModelState(name="m")], recent_prefix_hashes=hashes)
    node = NodeView.from_heartbeat(hb, 0.0)
    choice = LeastLoaded().rank([node], PlacementRequest(model="m", prompt_hashes=hashes, affinity_node="p"), 0.0).best
    assert choice.prefix_blocks == 2 and choice.affinity


def test_policies_by_name() -> None:
    assert set(POLICIES) == {"hotness", "round-robin", "least-loaded", "random"}
    for name in POLICIES:
        policy = make_policy(name, seed=1)
        assert policy.name == name
        assert policy.rank(NODES, REQ, 0.0).eligible == 3
    assert isinstance(make_policy("hotness"), HotnessAware)
    assert make_policy("hotness") is not make_policy("hotness")
    with pytest.raises(ValueError, match="choose one of hotness, least-loaded, random, round-robin"):
        make_policy("fastest")


def test_placement_section_of_the_configuration() -> None:
    config = PlacementConfig.from_config({"policy": "hotness", "weights": {"affinity": 3.0}})
    policy = config.build()
    assert isinstance(policy, HotnessAware) and policy.weights.affinity == 3.0
    assert PlacementConfig.from_config(None).policy == "hotness"
    assert PlacementConfig.from_config({"policy": "random", "seed": 3}).build().name == "random"
    with pytest.raises(ValueError, match="unknown placement policy 'best'"):
        PlacementConfig.from_config({"policy": "best"})
    with pytest.raises(ValueError, match=r"weights"):
        PlacementConfig.from_config({"weights": {"tier": "high"}})
