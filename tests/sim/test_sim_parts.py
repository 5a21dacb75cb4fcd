"""The simulator's parts against what they stand in for: the fleet's rescaling, a node's
heartbeat, the router's candidate lists, a reply's token ids, and splitting a run."""

from __future__ import annotations

import msgspec
import pytest
from sim_helpers import fleet_of, run, spec_of

from tierflow.contracts import registry
from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, BundleModel, DeploymentConfig, cold_load_time, switch_time
from tierflow.sim import SimConfig, Simulation
from tierflow.sim.client import SessionRun, reply
from tierflow.sim.fleet import PROCESS_START_S, scale_deployments, start_delay
from tierflow.sim.router import SimRouter
from tierflow.sim.shards import merge, partition
from tierflow.tokenizer import encode, render_chat
from tierflow.workload.sessions import CallPlan, plan_sessions


def _deployment(name: str, replicas: int, low: int, high: int, prefill: int = 0) -> registry.DeploymentRecord:
    mode = "disaggregated" if prefill else "aggregated"
    return registry.DeploymentRecord(
        name=name, bundle="b", models=[], replicas=replicas, min_replicas=low, max_replicas=high, mode=mode, prefill_replicas=prefill
    )


def test_rescaling_keeps_each_pools_share_and_hits_the_node_count_exactly() -> None:
    fleet = [_deployment("a", 2, 1, 4), _deployment("b", 5, 5, 5), _deployment("c", 1, 1, 2, prefill=3)]
    scaled = scale_deployments(fleet, 1000)  # 11 nodes -> 1000: shares 181.8, 454.5, 90.9 and 272.7
    got = {d.name: (d.replicas, d.min_replicas, d.max_replicas, d.prefill_replicas) for d in scaled}
    # floors add up to 997; the three largest remainders (.91, .82, .73) get the rest
    assert got == {"a": (182, 91, 364, 0), "b": (454, 454, 454, 0), "c": (91, 91, 182, 273)}
    assert sum(d.replicas + d.prefill_replicas for d in scaled) == 1000
    small = scale_deployments(fleet, 4)  # every pool keeps one node
    assert [(d.replicas, d.prefill_replicas) for d in small] == [(1, 0), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="--nodes 3 is fewer than the fleet's 4 pools"):
        scale_deployments(fleet, 3)


def test_a_new_node_takes_the_process_start_and_the_cold_load_of_its_bundle() -> None:
    profile = BUILTIN_PROFILES["sn40l-16"]
    big, small = BUILTIN_MODELS["llama-3.1-70b"], BUILTIN_MODELS["llama-3.1-8b"]
    bundle = [BundleModel(big, DeploymentConfig.parse("ss8192-bs4")), BundleModel(small, DeploymentConfig.parse("ss8192-bs4"))]
    # both hot: each cold-loaded into HBM; only the 70B hot: the 8B stops in DDR
    assert start_delay(profile, bundle, ["llama-3.1-70b", "llama-3.1-8b"]) == pytest.approx(
        PROCESS_START_S + cold_load_time(big, profile) + cold_load_time(small, profile)
    )
    assert start_delay(profile, bundle, ["llama-3.1-70b"]) == pytest.approx(
        PROCESS_START_S + cold_load_time(big, profile) + cold_load_time(small, profile) - switch_time(small, profile)
    )


PAIR = """
models:
  - {name: small, versions: [{version: v1, catalog: llama-3.1-8b}]}
  - {name: big, versions: [{version: v1, catalog: llama-3.1-70b}]}
  - {name: other, versions: [{version: v1, catalog: gpt-oss-20b}]}
bundles:
  - name: pair
    models: [{model: small, config: ss8192-bs4}, {model: big, config: ss8192-bs4}]
  - {name: lone, models: [{model: other, config: ss8192-bs4}]}
deployments:
  - {name: pair, bundle: pair, replicas: 3, min_replicas: 3, max_replicas: 3, profile: sn40l-16}
  - {name: lone, bundle: lone, replicas: 2, min_replicas: 2, max_replicas: 2, profile: sn40l-16}
"""

AGENT = """
name: agent
seed: 5
flows:
  - name: agent
    task_tokens: 300
    think_s: 0.2
    steps:
      - {model: small, role: planner, system_tokens: 200, max_tokens: 32}
      - {tool: search, latency_s: 0.5, output_tokens: 100}
      - {model: big, role: writer, system_tokens: 300, max_tokens: 64}
mix:
  weight: 0.5
  prompt_tokens: {mean: 400}
  max_tokens: {mean: 16}
  models: [{model: other}]
arrivals:
  - {kind: poisson, rate: 2.0, duration_s: 20}
"""


def test_the_routers_candidate_lists_are_the_tables_index_exactly() -> None:
    sim = Simulation(spec_of(AGENT), fleet_of(PAIR), SimConfig(seed=5, autoscale=False))
    sim.run()
    table = sim.router.nodes
    for model in ("small", "big", "other"):
        assert sim.router.candidates.serving(model).views == list(table.index().serving(model))
    assert sim.router.candidates.serving("big").ids == ["pair-decode-0", "pair-decode-1", "pair-decode-2"]


def test_a_reused_heartbeat_says_what_a_fresh_one_would() -> None:
    sim = Simulation(spec_of(AGENT), fleet_of(PAIR), SimConfig(seed=5, autoscale=False))
    sim.run()
    with_content = 0
    for node in sim.nodes.values():
        node.heartbeat(100.0, 1.0)  # after the run: nothing happens on the node any more
        reused, unchanged = node.heartbeat(101.0, 1.0)
        node.dirty = True
        fresh, _ = node.heartbeat(101.0, 1.0)
        assert unchanged
        assert msgspec.structs.replace(reused, seq=fresh.seq) == fresh
        with_content += any(m.recent_prefix_hashes for m in fresh.models)
    assert with_content >= 2  # heartbeats with content, not only empty ones (an idle spare node may have none)


def test_a_replys_token_ids_are_those_the_conversation_would_encode() -> None:
    for tokens in (1, 2, 7, 1000, 70_000):
        text, ids = reply(tokens)
        assert len(encode(text)) == tokens
        assert list(ids) == encode(render_chat([("assistant", text)]))[: -len(encode(render_chat([])))]
    plan = plan_sessions(spec_of(AGENT), seed=5)[0]
    session = SessionRun(plan)
    step = plan.steps[0]
    assert isinstance(step, CallPlan)
    session.record_reply(32)
    chat = [(m["role"], m["content"]) for m in session.conversation.messages(step.system_text)]
    assert session.conversation.prompt_token_ids(step.system_text) == encode(render_chat(chat))


def test_independent_deployments_split_into_parts_whose_merge_keeps_every_record() -> None:
    spec, fleet = spec_of(AGENT), fleet_of(PAIR)
    parts = partition(spec, fleet.deployments, 2)
    assert set(parts) == {frozenset({"pair"}), frozenset({"lone"})}
    assert partition(spec, fleet.deployments, 1) == [frozenset({"pair", "lone"})]
    limited = {"tenants": [{"name": "t", "api_keys": ["k"], "rate_limit_rps": 5.0}]}
    assert len(partition(spec, fleet.deployments, 2, router_config=limited)) == 1  # a shared budget keeps one part
    config = SimConfig(seed=5, autoscale=False)
    whole = Simulation(spec, fleet, config).run()
    pieces = [Simulation(spec, fleet, config, part=part).run() for part in parts]
    merged = merge(pieces)
    assert sorted(r.request_id for r in merged.records) == sorted(r.request_id for r in whole.records)
    assert {r.model for piece, part in zip(pieces, parts) if part == {"lone"} for r in piece.records} == {"other"}
    assert merged.stats.calls == whole.stats.calls and merged.stats.nodes_initial == 5
    assert merged.fleet_timeline[0].nodes == 5 and merged.fleet_timeline[0].by_deployment == {"pair": 3, "lone": 2}


def test_a_run_of_many_records_is_quick_and_counts_its_own_events() -> None:
    result = run(AGENT, PAIR, seed=5, autoscale=False)
    assert result.stats.events > result.stats.heartbeats > 0
    assert result.stats.calls == len(result.records)


def test_skipping_repeated_heartbeats_changes_no_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, fleet = spec_of(AGENT), fleet_of(PAIR)
    config = SimConfig(seed=5, autoscale=False)
    skipping = Simulation(spec, fleet, config).run()
    applied = 0
    heard = SimRouter.heard

    def every_beat(self: SimRouter, hb: object, now: float, *, unchanged: bool = False) -> None:
        nonlocal applied
        applied += unchanged
        heard(self, hb, now, unchanged=False)  # type: ignore[arg-type]

    monkeypatch.setattr(SimRouter, "heard", every_beat)
    every = Simulation(spec, fleet, config).run()
    assert applied > 40  # many beats repeated the last one, and were applied all the same
    assert every.records == skipping.records


def test_rescaling_down_gives_small_pools_their_node_from_the_largest() -> None:
    fleet = [_deployment("big", 400, 360, 460), _deployment("mid", 96, 86, 110), _deployment("tiny", 2, 2, 3, prefill=4)]
    scaled = scale_deployments(fleet, 50)  # shares 39.8, 9.6, 0.2 and 0.4: the tiny pools get 1 each
    assert [(d.replicas, d.prefill_replicas) for d in scaled] == [(39, 0), (9, 0), (1, 1)]
    assert sum(d.replicas + d.prefill_replicas for d in scaled) == 50
    # shares 9.6, 2.3, 0.05 and 0.1: the floors and minimums make 13, one more than asked;
    # it comes from the pool furthest above its share (2 for 2.3)
    assert [(d.replicas, d.prefill_replicas) for d in scale_deployments(fleet, 12)] == [(9, 0), (1, 0), (1, 1)]
