"""The router's exact prefix index: events applied, gaps noticed, snapshots replace (issue 17)."""

from __future__ import annotations

import pytest
from tierflow.contracts.messages import KvEvents, ModelKvEvents
from tierflow.placement.prefix_index import PrefixIndex


def ev(
    seq: int,
    *,
    snapshot: bool = False,
    node: str = "n1",
    started_at: float = 1.0,
    **models: dict[str, list[int]],
) -> KvEvents:
    return KvEvents(
        node_id=node, seq=seq, started_at=started_at, snapshot=snapshot,
        models=[ModelKvEvents(name=name, **lists) for name, lists in models.items()],
    )  # fmt: skip


def test_a_node_is_unknown_until_its_snapshot_then_exact() -> None:
    index = PrefixIndex()
    assert index.holder("n1", "m") is None
    assert index.apply(
        ev(5, m={"stored": [1, 2]}), now=0.0
    )  # joined mid-stream: ask for a snapshot
    assert index.holder("n1", "m") is None
    assert not index.apply(
        ev(6, m={"stored": [3]}), now=0.1
    )  # asked already, within resync_after
    assert index.apply(ev(7), now=2.0)  # still unknown a while later: ask again

    assert not index.apply(
        ev(8, snapshot=True, m={"stored": [1, 2], "spilled": [3]}), now=2.1
    )
    held = index.holder("n1", "m")
    assert held == {1: False, 2: False, 3: True}  # hash -> in DDR
    assert not index.apply(
        ev(9, m={"stored": [4], "spilled": [1], "restored": [3], "removed": [2]}),
        now=2.2,
    )
    assert held == {1: True, 3: False, 4: False}
    assert index.holder("n1", "m") is held  # the same live object every time
    assert index.holder("n1", "other") == {} and index.holder("n2", "m") is None


def test_a_gap_makes_the_node_unknown_and_asks_for_a_snapshot_which_replaces_in_place() -> (
    None
):
    index = PrefixIndex()
    index.apply(ev(1, snapshot=True, m={"stored": [1, 2, 3]}), now=0.0)
    held = index.holder("n1", "m")
    assert held is not None
    assert index.apply(ev(3, m={"stored": [9]}), now=1.0)  # 2 went missing
    assert index.gaps == 1 and index.holder("n1", "m") is None
    assert 9 not in held  # not applied after the gap
    assert not index.apply(
        ev(4, m={"removed": [1]}), now=1.1
    )  # nor anything before the snapshot
    assert not index.apply(ev(5, snapshot=True, m={"stored": [7]}), now=1.2)
    assert index.holder("n1", "m") is held and held == {
        7: False
    }  # replaced, same object


def test_a_restarted_node_is_known_again_from_its_first_snapshot() -> None:
    index = PrefixIndex()
    index.apply(ev(1, snapshot=True, m={"stored": [1]}), now=0.0)
    index.apply(ev(2, m={"stored": [2]}), now=0.1)
    assert index.apply(
        ev(3, started_at=2.0, m={"stored": [3]}), now=0.2
    )  # another process: not its sequel
    index.apply(ev(1, snapshot=True, started_at=2.0, m={"stored": [5]}), now=0.3)
    assert index.holder("n1", "m") == {5: False}


def test_a_large_snapshot_continues_as_plain_changes_and_a_lost_part_is_a_gap() -> None:
    index = PrefixIndex()
    index.apply(ev(1, snapshot=True, m={"stored": [1, 2]}), now=0.0)
    index.apply(ev(2, m={"stored": [3, 4]}), now=0.0)
    assert index.holder("n1", "m") == dict.fromkeys([1, 2, 3, 4], False)
    assert index.apply(ev(4, m={"stored": [5]}), now=5.0)


def test_cleared_forgets_a_model_first_and_models_stay_apart() -> None:
    index = PrefixIndex()
    index.apply(ev(1, snapshot=True, a={"stored": [1, 2]}, b={"stored": [1]}), now=0.0)
    index.apply(ev(2, a={"cleared": True, "stored": [3]}), now=0.0)
    assert index.holder("n1", "a") == {3: False} and index.holder("n1", "b") == {
        1: False
    }


def test_the_size_bound_keeps_the_most_recent_and_says_so() -> None:
    index = PrefixIndex(max_blocks=4)
    index.apply(ev(1, snapshot=True, m={"stored": [1, 2, 3]}), now=0.0)
    index.apply(ev(2, m={"restored": [1]}), now=0.0)  # 1 used again: most recent
    index.apply(ev(3, m={"stored": [4, 5]}), now=0.0)
    assert list(index.holder("n1", "m") or {}) == [3, 1, 4, 5]
    assert index.trimmed("n1") == 1 and index.blocks("n1") == 4


def test_forget_empties_the_live_sets_rows_still_hold() -> None:
    index = PrefixIndex()
    index.apply(ev(1, snapshot=True, m={"stored": [1]}), now=0.0)
    index.apply(ev(1, snapshot=True, node="n2", m={"stored": [1]}), now=0.0)
    held = index.holder("n1", "m")
    assert index.forget_all_but(["n2"]) == ["n1"]
    assert held == {} and index.holder("n1", "m") is None and index.knows("n2")


def test_bad_bound() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks=0)


def test_views_take_the_index_s_live_set_when_it_knows_the_node_else_the_heartbeat_s() -> None:
    from tierflow.contracts.messages import ModelState, NodeHeartbeat
    from tierflow.placement.tables import NodeTable

    index = PrefixIndex()
    table = NodeTable(prefix_sets=index.holder)
    beat = NodeHeartbeat(node_id="n1", models=[ModelState(name="m", tier="hbm", recent_prefix_hashes=[1])])
    table.apply(beat, 0.0)
    view = table.get("n1")
    assert view is not None and view.slots["m"].prefix_hashes == frozenset({1})  # the index does not know n1 yet
    index.apply(ev(1, snapshot=True, m={"stored": [1, 2, 3]}), now=0.0)
    table.apply(beat, 1.0)
    view = table.get("n1")
    assert view is not None
    held = view.slots["m"].prefix_hashes
    assert held is index.holder("n1", "m")
    index.apply(ev(2, m={"stored": [4]}), now=1.1)
    assert 4 in held  # the row sees changes between heartbeats
