"""The router's caches and the baseline placement over them."""

from __future__ import annotations

import random

from tierflow.contracts import messages, registry
from tierflow.placement.basic import rank_least_loaded
from tierflow.placement.tables import ModelTable, NodeTable


def _beat(node: str, *, queue: int = 0, running: int = 0, models: tuple[str, ...] = ("m",), started: float = 1.0, draining: bool = False, seq: int = 0) -> messages.NodeHeartbeat:
    return messages.NodeHeartbeat(
        node_id=node, models=[messages.ModelState(name=m, tier="hbm") for m in models],
        queue_depth=queue, running=running, max_batch=4, started_at=started, draining=draining, seq=seq,
    )


def test_least_loaded_first_and_ties_rotate() -> None:
    table = NodeTable()
    for node, queue in (("a", 3), ("b", 0), ("c", 0)):
        table.apply(_beat(node, queue=queue), now=10.0)
    first = {rank_least_loaded(table.views, "m", 10.0, turn=t)[0] for t in range(4)}
    assert first == {"b", "c"}
    assert rank_least_loaded(table.views, "m", 10.0)[-1] == "a"


def test_silent_draining_and_suspect_nodes_are_out_of_rotation() -> None:
    table = NodeTable(suspect_seconds=5.0)
    table.apply(_beat("old"), now=0.0)
    table.apply(_beat("draining", draining=True), now=9.5)
    table.apply(_beat("ok"), now=9.5)
    table.apply(_beat("flaky"), now=9.5)
    table.mark_suspect("flaky", now=9.5)
    assert rank_least_loaded(table.views, "m", 10.0) == ["ok"]
    table.apply(_beat("flaky", started=2.0), now=10.0)  # restarted: clean slate
    assert sorted(rank_least_loaded(table.views, "m", 10.0)) == ["flaky", "ok"]


def test_a_suspect_node_is_back_at_its_second_heartbeat_after_the_failure() -> None:
    """Not `suspect_seconds` later: after a NATS outage every node was marked at once, and
    clients would get 503s for seconds while every node beats again."""
    table = NodeTable(suspect_seconds=30.0)
    table.apply(_beat("n", seq=7), now=1.0)
    table.mark_suspect("n", now=1.5)
    table.apply(_beat("n", seq=8), now=2.0)  # may have been sent before the failure
    assert rank_least_loaded(table.views, "m", 2.0) == []
    table.apply(_beat("n", seq=9), now=3.0)
    assert rank_least_loaded(table.views, "m", 3.0) == ["n"]


def test_only_nodes_with_the_model_are_candidates() -> None:
    table = NodeTable()
    table.apply(_beat("a", models=("x",)), now=1.0)
    assert rank_least_loaded(table.views, "m", 1.0) == []


def test_models_are_served_only_when_deployed_with_their_context() -> None:
    table = ModelTable()
    table.put_model(registry.ModelRecord(name="m", versions=[registry.ModelVersionRecord(version="v1")], default_version="v1"))
    assert table.routes == {}
    table.put_deployment(registry.DeploymentRecord(name="d", bundle="b", models=[registry.BundleEntry(model="m", version="v1", config="ss16384-bs1-cb2-128")]))
    assert table.routes["m"].max_context == 16384
    table.delete_deployment("d")
    assert table.routes == {}


def test_traffic_split_picks_versions_by_weight() -> None:
    table = ModelTable()
    versions = [registry.ModelVersionRecord(version=v) for v in ("v1", "v2")]
    table.put_model(registry.ModelRecord(name="m", versions=versions, default_version="v1", traffic={"v1": 90, "v2": 10}))
    table.put_deployment(registry.DeploymentRecord(name="d", bundle="b", models=[registry.BundleEntry(model="m", version="v1")]))
    rng = random.Random(0)
    picks = [table.routes["m"].pick_version(rng) for _ in range(5000)]
    assert 0.08 < picks.count("v2") / len(picks) < 0.12
