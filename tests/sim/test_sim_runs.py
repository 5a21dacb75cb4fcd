"""A simulation is a pure function of its inputs, and it runs the live request path's steps.

Determinism, the timing of one request end to end (hops, prefill, the first token), a
disaggregated deployment's extra leg (prefill node, KV transfer, decode node), a failed
call ending its session, and the spec's models checked against the fleet before a run.
"""

from __future__ import annotations

import pytest

from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, kv_transfer_time, kv_write_time, prefill_time
from tierflow.rdu.timing import DecodeCostModel
from tierflow.sim import HOP_S, SimConfig, SimError, simulate

from sim_helpers import fleet_of, run, spec_of

PAIR = """
models:
  - {name: small, versions: [{version: v1, catalog: llama-3.1-8b}]}
  - {name: big, versions: [{version: v1, catalog: llama-3.1-70b}]}
bundles:
  - name: pair
    models: [{model: small, config: ss8192-bs4}, {model: big, config: ss8192-bs4}]
deployments:
  - {name: pair, bundle: pair, replicas: 3, min_replicas: 3, max_replicas: 3, profile: sn40l-16}
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
arrivals:
  - {kind: poisson, rate: 2.0, duration_s: 30}
"""


def test_the_same_seed_gives_the_same_records_and_another_seed_other_ones() -> None:
    first = run(AGENT, PAIR, seed=5)
    again = run(AGENT, PAIR, seed=5)
    other = run(AGENT, PAIR, seed=6)
    assert len(first.records) > 80
    assert first.records == again.records
    assert first.fleet_timeline == again.fleet_timeline
    assert [r.sent_at for r in other.records] != [r.sent_at for r in first.records]


def test_a_session_runs_its_steps_in_order_with_tool_latency_and_think_time_between() -> None:
    result = run(AGENT, PAIR, seed=5)
    by_session: dict[str, list] = {}
    for record in result.records:
        by_session.setdefault(record.session_id, []).append(record)
    for records in by_session.values():
        planner, writer = sorted(records, key=lambda r: r.step)
        assert (planner.step, writer.step) == (0, 2)
        assert planner.outcome == writer.outcome == "ok"
        assert planner.completion_tokens == 32 and writer.completion_tokens == 64
        # after the planner's reply: think, the tool's 0.5 s, think again, then the writer is sent
        assert writer.sent_at == pytest.approx(planner.finished_at + 0.2 + 0.5 + 0.2)
        # the writer's prompt holds the planner's reply and the tool's output on top of the task
        assert writer.prompt_tokens > planner.prompt_tokens + 32 + 100


SOLO = """
models:
  - {name: big, versions: [{version: v1, catalog: llama-3.1-70b}]}
bundles:
  - {name: solo, models: [{model: big, config: ss8192-bs4}]}
deployments:
  - {name: solo, bundle: solo, replicas: 1, min_replicas: 1, max_replicas: 1, profile: sn40l-16}
"""

ONE_CALL = """
name: one
seed: 1
mix:
  prompt_tokens: {mean: 1000}
  max_tokens: {mean: 50}
  models: [{model: big}]
arrivals:
  - {kind: steady, rate: 1.0, duration_s: 1.0}
"""


def test_one_request_takes_its_hops_its_prefill_and_its_decode_steps_exactly() -> None:
    result = run(ONE_CALL, SOLO, autoscale=False)
    [record] = result.records
    spec, profile = BUILTIN_MODELS["llama-3.1-70b"], BUILTIN_PROFILES["sn40l-16"]
    prefill = prefill_time(spec, profile, [(record.prompt_tokens, 0)])
    # client -> router -> node, the prefill (its end is the first token), node -> router -> client
    assert record.first_token_at - record.sent_at == pytest.approx(4 * HOP_S + prefill, rel=1e-9)
    cost = DecodeCostModel(spec, profile)
    steps, context = 0.0, record.prompt_tokens + 1
    for _ in range(record.completion_tokens - 1):  # every later token is one decode step of a batch of one
        steps += cost.step_seconds(1, context)
        context += 1
    assert record.finished_at - record.first_token_at == pytest.approx(steps, rel=1e-9)
    assert (record.tier, record.node, record.cached_tokens) == ("hbm", "solo-decode-0", 0)


DISAGG = """
models:
  - {name: big, versions: [{version: v1, catalog: llama-3.1-70b}]}
bundles:
  - {name: throughput, models: [{model: big, config: ss8192-bs1-cb2-64}]}
deployments:
  - {name: disagg, bundle: throughput, workload: high-throughput, mode: disaggregated,
     replicas: 1, prefill_replicas: 3, min_replicas: 1, max_replicas: 1, profile: sn40l-16}
"""


def test_a_disaggregated_deployment_prefills_on_a_prefill_node_and_ships_the_kv() -> None:
    result = run(ONE_CALL, DISAGG, autoscale=False)
    [record] = result.records
    spec, profile = BUILTIN_MODELS["llama-3.1-70b"], BUILTIN_PROFILES["sn40l-16"]
    n = record.prompt_tokens
    prefill = prefill_time(spec, profile, [(n, 0)])  # on the prefill node, prompt -> KV
    transfer = kv_transfer_time(spec, profile, n)  # prefill node -> decode node, over the link
    write = kv_write_time(spec, profile, n)  # the decode node writes the arrived KV into HBM
    # client -> router -> prefill node; KV ready -> router -> decode node; first token -> router -> client
    assert record.first_token_at - record.sent_at == pytest.approx(6 * HOP_S + prefill + transfer + write, rel=1e-9)
    assert transfer > 0.003 and write > 0  # 1,000 tokens of a 70B model: 3.3 ms over 100 GB/s
    assert record.node == "disagg-decode-0" and record.outcome == "ok" and record.completion_tokens == 50


def test_a_spec_model_the_fleet_does_not_deploy_is_refused_before_the_run_by_path() -> None:
    spec = spec_of(AGENT.replace("model: big", "model: huge"))
    with pytest.raises(SimError) as caught:
        simulate(spec, fleet_of(PAIR), SimConfig())
    assert caught.value.problems == ["$.flows[0].steps[2].model: 'huge' is not deployed by the fleet (deployed: big, small)"]


def test_a_call_the_model_cannot_hold_fails_with_the_routers_400_and_ends_its_session() -> None:
    long_task = AGENT.replace("task_tokens: 300", "task_tokens: 8150")  # + system + reply > 8192
    result = run(long_task, PAIR, seed=5, autoscale=False)
    assert result.records
    for record in result.records:
        assert (record.step, record.outcome, record.status, record.error) == (0, "error", 400, "context_length_exceeded")
    assert len({r.session_id for r in result.records}) == len(result.records)  # no session went on to step 2


def test_the_engines_fast_mode_gives_every_request_the_times_step_by_step_gives() -> None:
    """Without per-token events a request's first token is inferred (the end of the prefill
    it started in); with them it is observed. Both must agree, to the last bit."""
    fast = run(AGENT, PAIR, seed=5, autoscale=False)
    stepped = run(AGENT, PAIR, seed=5, autoscale=False, token_events=True)
    assert len(fast.records) > 80
    assert fast.records == stepped.records
