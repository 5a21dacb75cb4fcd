"""Hotness-aware ranking: one test per scoring term, weights that change the ranking, reasons."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tierflow.contracts import messages
from tierflow.placement import HotnessAware, ModelSlot, NodeView, PlacementRequest, PlacementWeights
from tierflow.rdu import block_hashes


def _node(node_id: str, *, tier: str = "hbm", queue: int = 0, running: int = 0, kv: float = 0.0,
          hashes: Sequence[int] = (), workload: str = "bundle") -> NodeView:
    hb = messages.NodeHeartbeat(
        node_id=node_id, models=[messages.ModelState(name="m", version="v1", tier=tier)],  # type: ignore[arg-type]
        queue_depth=queue, running=running, max_batch=4, kv_usage=kv, recent_prefix_hashes=list(hashes),
    )
    return NodeView.from_heartbeat(hb, 0.0, workload=workload)


def _order(nodes: list[NodeView], request: PlacementRequest | None = None, policy: HotnessAware | None = None) -> list[str]:
    placement = (policy or HotnessAware()).rank(nodes, request or PlacementRequest(model="m"), 0.0)
    return placement.node_ids


PROMPT = block_hashes(list(range(64 * 10)), 64)  # 10 chained blocks


def test_tier_hbm_then_ddr_then_loading_then_cold() -> None:
    nodes = [_node("cold", tier="cold"), _node("loading", tier="loading"), _node("ddr", tier="ddr"), _node("hbm", tier="hbm")]
    placement = HotnessAware().rank(nodes, PlacementRequest(model="m"), 0.0)
    assert placement.node_ids == ["hbm", "ddr", "loading", "cold"]
    assert [c.reason for c in placement.choices] == ["hbm", "ddr", "loading", "cold"]
    assert [c.tier for c in placement.choices] == ["hbm", "ddr", "loading", "cold"]


def test_prefix_overlap_counts_the_leading_run_only() -> None:
    nodes = [
        _node("tail-only", hashes=PROMPT[1:]),  # 9 blocks cached but not the first: no use
        _node("two", hashes=PROMPT[:2]),
        _node("five", hashes=PROMPT[:5] + PROMPT[7:]),  # a hole at block 5 ends the run
        _node("all", hashes=PROMPT + [12345]),
    ]
    placement = HotnessAware().rank(nodes, PlacementRequest(model="m", prompt_hashes=PROMPT), 0.0)
    assert placement.node_ids == ["all", "five", "two", "tail-only"]
    assert [c.prefix_blocks for c in placement.choices] == [10, 5, 2, 0]
    assert placement.choices[1].reason == "hbm+prefix"
    assert placement.choices[1].detail == "hbm+prefix(5 blocks)"
    assert placement.choices[3].detail == "hbm"


def test_no_prompt_hashes_means_no_prefix_term() -> None:
    placement = HotnessAware().rank([_node("a", hashes=PROMPT)], PlacementRequest(model="m"), 0.0)
    assert placement.best.prefix_blocks == 0 and placement.best.reason == "hbm"


def test_queue_depth_then_batch_occupancy_then_kv_usage() -> None:
    assert _order([_node("q8", queue=8), _node("q0"), _node("q4", queue=4)]) == ["q0", "q4", "q8"]
    assert _order([_node("r4", running=4), _node("r1", running=1), _node("r2", running=2)]) == ["r1", "r2", "r4"]
    assert _order([_node("kv9", kv=0.9), _node("kv1", kv=0.1)]) == ["kv1", "kv9"]


def test_session_affinity_breaks_an_otherwise_even_ranking() -> None:
    nodes = [_node("a"), _node("b"), _node("c")]
    placement = HotnessAware().rank(nodes, PlacementRequest(model="m", session_id="s", affinity_node="b"), 0.0)
    assert placement.best.node_id == "b" and placement.best.affinity
    assert placement.best.reason == "hbm+affinity"
    assert not any(c.affinity for c in placement.choices[1:])


def test_affinity_does_not_drag_a_session_onto_a_cold_model() -> None:
    nodes = [_node("warm"), _node("last", tier="cold")]
    assert _order(nodes, PlacementRequest(model="m", affinity_node="last")) == ["warm", "last"]


@pytest.mark.parametrize(
    ("workload", "expected"),
    [("interactive", ["hi", "bundle", "ht"]), ("batch", ["ht", "bundle", "hi"])],
)
def test_workload_class_prefers_its_deployments(workload: str, expected: list[str]) -> None:
    nodes = [_node("bundle"), _node("ht", workload="high-throughput"), _node("hi", workload="high-interactivity")]
    assert _order(nodes, PlacementRequest(model="m", workload=workload)) == expected  # type: ignore[arg-type]


def test_weights_change_the_ranking() -> None:
    busy_hot, idle_ddr = _node("busy-hot", queue=8), _node("idle-ddr", tier="ddr")
    assert _order([busy_hot, idle_ddr]) == ["idle-ddr", "busy-hot"]
    no_queue = HotnessAware(PlacementWeights(queue=0.0, contention=0.0))
    assert _order([busy_hot, idle_ddr], policy=no_queue) == ["busy-hot", "idle-ddr"]

    long_prompt = block_hashes(list(range(64 * 60)), 64)
    cached_ddr, bare_hbm = _node("cached-ddr", tier="ddr", hashes=long_prompt), _node("bare-hbm")
    request = PlacementRequest(model="m", prompt_hashes=long_prompt)
    assert _order([bare_hbm, cached_ddr], request) == ["cached-ddr", "bare-hbm"]  # 60 blocks outweigh a switch
    assert _order([bare_hbm, cached_ddr], request, HotnessAware(PlacementWeights(prefix=0.0))) == ["bare-hbm", "cached-ddr"]
    assert _order([bare_hbm, cached_ddr], request, HotnessAware(PlacementWeights(tier=10.0))) == ["bare-hbm", "cached-ddr"]


def test_a_switch_cost_estimate_replaces_the_tier_table() -> None:
    def switch(node: NodeView, slot: ModelSlot) -> float:
        return {"a": 5.0, "b": 0.0}[node.node_id]  # e.g. b's model is small: a DDR switch is free

    nodes = [_node("a", tier="hbm"), _node("b", tier="ddr")]
    assert _order(nodes) == ["a", "b"]
    assert _order(nodes, policy=HotnessAware(switch_cost=switch)) == ["b", "a"]


def test_cost_is_in_seconds() -> None:
    w = PlacementWeights()
    placement = HotnessAware(w).rank([_node("a", tier="ddr", queue=4, running=2, kv=0.5)], PlacementRequest(model="m"), 0.0)
    # the node's queue is not this model's (its slot has none): another model has work there
    expected = w.ddr_seconds + 1.0 * w.batch_turn_seconds + 0.5 * w.full_batch_seconds + 0.5 * w.full_kv_seconds + w.contention_seconds
    assert placement.best.score == pytest.approx(expected)


def test_a_node_busy_with_another_model_costs_a_turn() -> None:
    busy_other = _node("busy-other", running=2)  # two requests running, none of them for "m"
    idle = _node("idle", tier="ddr")
    assert _order([busy_other, idle]) == ["idle", "busy-other"]
    assert _order([busy_other, idle], policy=HotnessAware(PlacementWeights(contention=0.0, occupancy=0.0))) == ["busy-other", "idle"]


def test_limit_returns_the_best_few_of_the_same_order() -> None:
    nodes = [_node(f"n{i}", queue=i) for i in range(10)]
    placement = HotnessAware().rank(nodes, PlacementRequest(model="m"), 0.0, limit=3)
    assert placement.node_ids == ["n0", "n1", "n2"] and placement.eligible == 10
    with pytest.raises(ValueError, match="limit"):
        HotnessAware().rank(nodes, PlacementRequest(model="m"), 0.0, limit=0)


def test_equal_nodes_share_work() -> None:
    policy = HotnessAware()
    nodes = [_node(c) for c in "abcd"]
    firsts = [policy.rank(nodes, PlacementRequest(model="m"), 0.0, limit=1).best.node_id for _ in range(8)]
    assert set(firsts) == set("abcd")


def test_weights_load_from_configuration() -> None:
    w = PlacementWeights.from_config({"affinity": 2.0, "cold_seconds": 12})
    assert w.affinity == 2.0 and w.cold_seconds == 12.0 and w.tier == 1.0
    assert PlacementWeights.from_config(None) == PlacementWeights()
    with pytest.raises(ValueError, match="affinty"):
        PlacementWeights.from_config({"affinty": 2.0})
    with pytest.raises(ValueError, match=r"queue"):
        PlacementWeights.from_config({"queue": -1})


def test_per_model_prefix_sets_win_over_the_node_wide_set() -> None:
    """A node that cached the prompt for another model of its bundle has nothing for this one."""
    other_model_only = NodeView(node_id="x", slots={"m": ModelSlot(name="m", version="v1", tier="hbm", prefix_hashes=frozenset())},
                                prefix_hashes=frozenset(PROMPT), last_seen=0.0)
    this_model = NodeView(node_id="y", slots={"m": ModelSlot(name="m", version="v1", tier="hbm", prefix_hashes=frozenset(PROMPT[:3]))},
                          last_seen=0.0)
    placement = HotnessAware().rank([other_model_only, this_model], PlacementRequest(model="m", prompt_hashes=PROMPT), 0.0)
    assert placement.node_ids == ["y", "x"] and [c.prefix_blocks for c in placement.choices] == [3, 0]


# -- prefill priced in seconds (issue 17) ----------------------------------------------
RATE = 1.5e-5  # seconds per prompt token: an 8B model on sn40l-16


def _queued(node: NodeView, tokens: int) -> NodeView:
    from dataclasses import replace

    return replace(node, queued_prompt_tokens=tokens)


def test_a_cached_prefix_is_worth_the_prefill_it_saves_and_no_more() -> None:
    policy = HotnessAware(prefill_rate=lambda node, slot: RATE)
    request = PlacementRequest(model="m", prompt_hashes=PROMPT, prompt_tokens=64 * 10 + 5)
    placement = policy.rank([_node("cold-cache"), _node("warm", hashes=PROMPT[:6])], request, 0.0)
    warm, other = placement.choices
    assert (warm.node_id, warm.prefix_blocks) == ("warm", 6)
    assert other.score - warm.score == pytest.approx(6 * 64 * RATE)  # 6 blocks' prefill, ~6 ms: not PlacementWeights' flat 5 ms a block
    assert warm.score == pytest.approx((645 - 6 * 64) * RATE)  # what remains is the prompt's own prefill there


def test_prompts_queued_ahead_outweigh_a_prefix_that_saves_less() -> None:
    policy = HotnessAware(prefill_rate=lambda node, slot: RATE)
    request = PlacementRequest(model="m", prompt_hashes=PROMPT, prompt_tokens=640)
    warm = _node("warm", hashes=PROMPT)  # saves 640 tokens of prefill, ~10 ms
    assert _order([_node("idle"), _queued(warm, 200)], request, policy)[0] == "warm"  # 3 ms queued: the cache wins
    assert _order([_node("idle"), _queued(warm, 60_000)], request, policy)[0] == "idle"  # 0.9 s queued: go elsewhere
    # without a rate (hardware unknown) the queue is not priced and the flat credit applies
    assert _order([_node("idle"), _queued(warm, 60_000)], request)[0] == "warm"


def test_the_prompt_runs_where_its_prefill_is_fastest() -> None:
    """Heterogeneous hardware: the same prompt prefills faster on one deployment."""
    rates = {"slow": 4 * RATE, "fast": RATE}
    policy = HotnessAware(prefill_rate=lambda node, slot: rates[node.node_id])
    request = PlacementRequest(model="m", prompt_tokens=20_000)
    assert _order([_node("slow"), _node("fast", running=3)], request, policy) == ["fast", "slow"]


def test_the_node_table_follows_a_request_between_heartbeats() -> None:
    """Dispatched: queued with its uncached prompt; first token back: in the batch, prompt
    off the prefill queue; finished: out. A heartbeat replaces all of it with the node's
    own counts, and only prompt tokens booked since then are taken back."""
    from tierflow.placement.tables import NodeTable

    table = NodeTable()
    hb = messages.NodeHeartbeat(node_id="n", models=[messages.ModelState(name="m", tier="hbm", max_batch=4)], max_batch=4, queued_prompt_tokens=100)  # type: ignore[arg-type]
    table.apply(hb, 0.0)

    def state() -> tuple[int, int, int, int, int]:
        view = table.get("n")
        assert view is not None
        slot = view.slots["m"]
        return view.queue_depth, view.running, slot.queued, slot.in_flight, view.queued_prompt_tokens

    table.note_dispatch("n", "m", prompt_tokens=5_000)
    table.note_dispatch("n", "other-model", prompt_tokens=7)
    assert state() == (2, 0, 1, 0, 5_107)
    assert table.note_started("n", "m", 5_000)
    assert state() == (1, 1, 0, 1, 107)
    assert not table.note_started("n", "other-model", 7)  # under a block: its first token moves nothing
    table.note_ended("n", "other-model", started=False, prompt_tokens=7)  # out of the queue at its end
    assert state() == (0, 1, 0, 1, 100)
    table.note_ended("n", "m", started=True)
    assert state() == (0, 0, 0, 0, 100)
    table.note_ended("n", "m", started=True)  # counts never go below zero
    assert state() == (0, 0, 0, 0, 100)
    table.apply(hb, 1.0)  # the node's own figures replace the router's
    table.note_dispatch("n", "m", prompt_tokens=50)
    table.note_ended("n", "m", started=False, prompt_tokens=5_000)  # only what was booked since the heartbeat comes off
    assert state() == (0, 0, 0, 0, 100)
