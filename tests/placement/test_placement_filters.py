"""The filter: health, model and version, boundary (fail closed), retries; and why nothing passes."""

from __future__ import annotations

import pytest

from tierflow.contracts import messages
from tierflow.placement import (
    Boundary,
    HotnessAware,
    LeastLoaded,
    NoEligibleNode,
    NodeView,
    PlacementRequest,
    Random,
    RoundRobin,
    diagnose,
    eligible,
)

EU = Boundary(regions=frozenset({"eu"}))
EU_RESIDENT = Boundary(regions=frozenset({"eu"}), residency="gdpr")


def _node(node_id: str, *, region: str = "us", residency: str = "", seen: float = 10.0, model: str = "m",
          version: str = "v1", **kw: object) -> NodeView:
    hb = messages.NodeHeartbeat(
        node_id=node_id, region=region, residency=residency,
        models=[messages.ModelState(name=model, version=version, tier="hbm")], max_batch=4, **kw,  # type: ignore[arg-type]
    )
    return NodeView.from_heartbeat(hb, seen)


def _ids(nodes: list[NodeView], request: PlacementRequest, now: float = 10.0) -> list[str]:
    return [n.node_id for n, _ in eligible(nodes, request, now)]


def test_unhealthy_nodes_are_filtered() -> None:
    nodes = [
        _node("ok"),
        _node("stale", seen=6.9),  # 3.1 intervals ago
        _node("cordoned", cordoned=True),
        _node("draining", draining=True),
        NodeView.from_heartbeat(messages.NodeHeartbeat(node_id="suspect", models=[messages.ModelState(name="m")]), 10.0, suspect_until=12.0),
        _node("other-model", model="x"),
    ]
    assert _ids(nodes, PlacementRequest(model="m")) == ["ok"]


def test_version_must_match_when_asked() -> None:
    nodes = [_node("a", version="v1"), _node("b", version="v2")]
    assert _ids(nodes, PlacementRequest(model="m", version="v2")) == ["b"]
    assert _ids(nodes, PlacementRequest(model="m")) == ["a", "b"]
    with pytest.raises(NoEligibleNode) as err:
        HotnessAware().rank(nodes, PlacementRequest(model="m", version="v3"), 10.0)
    assert err.value.code == "version_not_served"
    assert "'v3'" in err.value.reason and "v1, v2" in err.value.reason


def test_boundary_keeps_requests_inside_regions_and_residency() -> None:
    nodes = [_node("us-1"), _node("eu-1", region="eu"), _node("eu-gdpr", region="eu", residency="gdpr")]
    assert _ids(nodes, PlacementRequest(model="m", boundary=EU)) == ["eu-1", "eu-gdpr"]
    assert _ids(nodes, PlacementRequest(model="m", boundary=EU_RESIDENT)) == ["eu-gdpr"]
    # a residency-tagged node still serves unbounded tenants
    assert _ids(nodes, PlacementRequest(model="m")) == ["us-1", "eu-1", "eu-gdpr"]


@pytest.mark.parametrize("policy", [HotnessAware(), LeastLoaded(), RoundRobin(), Random(0)], ids=lambda p: p.name)
def test_residency_fails_closed_when_every_eu_node_is_down(policy: object) -> None:
    nodes = [
        _node("us-1"), _node("us-2"),  # healthy, idle, outside
        _node("eu-1", region="eu", seen=0.0),  # silent
        _node("eu-2", region="eu", draining=True),
    ]
    request = PlacementRequest(model="m", boundary=EU)
    with pytest.raises(NoEligibleNode) as err:
        policy.rank(nodes, request, 10.0)  # type: ignore[attr-defined]
    assert err.value.code == "unavailable"
    assert "region(s) {eu}" in err.value.reason
    assert "1 silent" in err.value.reason and "1 draining" in err.value.reason
    assert "us-" not in err.value.reason


def test_no_node_inside_the_boundary_names_it() -> None:
    nodes = [_node("us-1"), _node("eu-1", region="eu")]
    with pytest.raises(NoEligibleNode) as err:
        HotnessAware().rank(nodes, PlacementRequest(model="m", boundary=EU_RESIDENT), 10.0)
    assert err.value.code == "outside_boundary"
    assert "region(s) {eu} and residency 'gdpr'" in err.value.reason
    assert "never placed outside" in err.value.reason


def test_model_served_nowhere() -> None:
    err = diagnose([_node("a", model="x")], PlacementRequest(model="m"), 10.0)
    assert err.code == "model_not_served" and err.reason == "no node serves model 'm'"
    assert diagnose([], PlacementRequest(model="m"), 10.0).code == "model_not_served"


def test_retries_skip_tried_nodes_and_say_so_when_none_is_left() -> None:
    nodes = [_node("a"), _node("b")]
    assert _ids(nodes, PlacementRequest(model="m", exclude=frozenset({"a"}))) == ["b"]
    with pytest.raises(NoEligibleNode) as err:
        LeastLoaded().rank(nodes, PlacementRequest(model="m", exclude=frozenset({"a", "b"})), 10.0)
    assert err.value.code == "all_tried" and err.value.counts == {"already tried": 2}


def test_unbounded_message_does_not_mention_a_boundary() -> None:
    err = diagnose([_node("a", cordoned=True)], PlacementRequest(model="m"), 10.0)
    assert err.code == "unavailable" and "inside" not in err.reason and "1 cordoned" in err.reason
