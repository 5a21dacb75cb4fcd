"""NodeView: built from a heartbeat, liveness by missed beats, the router's older constructor."""

from __future__ import annotations

from dataclasses import replace

from tierflow.contracts import messages
from tierflow.placement import MISSED_BEATS, FleetIndex, NodeView


def _beat(**kw: object) -> messages.NodeHeartbeat:
    base: dict[str, object] = dict(
        node_id="n1",
        deployment="bundle-a",
        region="eu-west",
        residency="eu",
        interval_s=2.0,
        models=[
            messages.ModelState(name="m", version="v1", tier="ddr", in_flight=1),
            messages.ModelState(name="m", version="v2", tier="hbm"),
            messages.ModelState(name="x", version="v1", tier="cold"),
        ],
        queue_depth=8,
        running=2,
        max_batch=4,
        kv_usage=0.5,
        recent_prefix_hashes=[3, 2, 1],
        cordoned=False,
    )
    base.update(kw)
    return messages.NodeHeartbeat(**base)  # type: ignore[arg-type]


def test_from_heartbeat_keeps_what_placement_reads() -> None:
    view = NodeView.from_heartbeat(_beat(), 100.0, workload="high-interactivity", suspect_until=101.0)
    assert view.node_id == "n1" and view.region == "eu-west" and view.residency == "eu"
    assert view.deployment == "bundle-a" and view.workload == "high-interactivity"
    assert view.prefix_hashes == frozenset({1, 2, 3})
    assert view.models == frozenset({"m", "x"})
    # two versions of one model: the unversioned slot is the hotter, both are addressable
    assert view.slot("m").version == "v2"  # type: ignore[union-attr]
    assert view.slot("m", "v1").tier == "ddr"  # type: ignore[union-attr]
    assert view.slot("m", "v1").in_flight == 1  # type: ignore[union-attr]
    assert view.slot("m", "v3") is None and view.slot("y") is None
    assert view.tiers == {"m": "hbm", "x": "cold"}
    assert view.load == (8 + 2) / 4 and view.backlog == 2.0 and view.occupancy == 0.5
    assert view.suspect_until == 101.0 and view.last_seen == 100.0


def test_silent_for_three_intervals_is_out_of_rotation() -> None:
    view = NodeView.from_heartbeat(_beat(), 100.0)  # interval 2 s
    assert MISSED_BEATS == 3.0
    assert view.is_live(106.0) and view.takes_work(106.0)
    assert not view.is_live(106.01) and not view.takes_work(106.01)


def test_cordoned_draining_suspect_take_no_work() -> None:
    assert not NodeView.from_heartbeat(_beat(cordoned=True), 0.0).takes_work(0.0)
    assert not NodeView.from_heartbeat(_beat(draining=True), 0.0).takes_work(0.0)
    suspect = NodeView.from_heartbeat(_beat(), 0.0, suspect_until=1.0)
    assert not suspect.takes_work(0.5) and suspect.takes_work(1.0)


def test_router_keywords_still_build_a_view() -> None:
    """the router's NodeTable (placement/tables.py) builds views with models/tiers until it moves to from_heartbeat."""
    view = NodeView(
        node_id="a", models=frozenset({"m"}), tiers={"m": "hbm"}, region="r", residency="",
        queue_depth=1, running=0, max_batch=4, last_seen=1.0, interval_s=1.0,
        cordoned=False, draining=False, suspect_until=0.0,
    )
    assert view.slot("m") is not None and view.slot("m").tier == "hbm"  # type: ignore[union-attr]
    assert view.slot("m", "v1") is None  # unknown version: only version-agnostic requests
    bumped = replace(view, queue_depth=5)  # what NodeTable.note_dispatch does
    assert bumped.backlog == 5 / 4 and bumped.slots == view.slots and bumped.models == view.models


def test_replace_rederives_what_it_precomputes() -> None:
    view = NodeView.from_heartbeat(_beat(), 0.0)
    later = replace(view, last_seen=50.0, running=4)
    assert later.stale_after == 50.0 + 3 * 2.0 and later.occupancy == 1.0
    assert replace(view, draining=True).blocked


def test_fleet_index_groups_by_model() -> None:
    a = NodeView.from_heartbeat(_beat(node_id="a"), 0.0)
    b = NodeView.from_heartbeat(_beat(node_id="b", models=[messages.ModelState(name="x")]), 0.0)
    index = FleetIndex.build([a, b])
    assert [n.node_id for n in index.serving("m")] == ["a"]
    assert [n.node_id for n in index.serving("x")] == ["a", "b"]
    assert index.serving("nope") == () and len(index.nodes) == 2
