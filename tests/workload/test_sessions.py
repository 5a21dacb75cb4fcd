"""Session plans: deterministic for a seed, weights honoured, every text exactly its token count."""

from __future__ import annotations

import math
from collections import Counter

import msgspec
import pytest

from tierflow.tokenizer import OUTPUT_VOCAB, count_tokens
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan, plan_sessions, system_text
from tierflow.workload.spec import WorkloadSpec, parse_spec

SPEC = """\
name: t
seed: 3
tenants:
  - {name: a, api_key: ka, weight: 3, workload: interactive}
  - {name: b, api_key: kb, weight: 1}
flows:
  - name: agent
    weight: 3
    task_tokens: 50
    think_s: 0.1
    steps:
      - {model: m1, role: planner, system_tokens: 100, max_tokens: 10}
      - {tool: search, latency_s: 0.5, output_tokens: 30}
      - {model: m2, system_tokens: 70, max_tokens: {mean: 20, sd: 50, min: 5, max: 40}}
  - name: only-b
    weight: 1
    tenants: [b]
    steps: [{model: m1, system_tokens: 0, max_tokens: 4}]
mix: {weight: 1, prompt_tokens: {mean: 30, sd: 10, min: 10, max: 50}, max_tokens: {mean: 8}, models: [{model: m3}]}
arrivals: [{kind: poisson, rate: 20, duration_s: 100}]
"""


@pytest.fixture(scope="module")
def spec() -> WorkloadSpec:
    return parse_spec(SPEC)


@pytest.fixture(scope="module")
def plans(spec: WorkloadSpec) -> list[SessionPlan]:
    return plan_sessions(spec)


def _share_within(count: int, total: int, p: float) -> bool:
    """`count` of `total` is a binomial(total, p) draw within 4 sigma."""
    return abs(count - total * p) <= 4 * math.sqrt(total * p * (1 - p))


def test_the_same_arguments_give_the_same_plans(spec: WorkloadSpec, plans: list[SessionPlan]) -> None:
    assert msgspec.json.encode(plan_sessions(spec)) == msgspec.json.encode(plans)
    other = plan_sessions(spec, seed=4)
    assert [p.start for p in other[:20]] != [p.start for p in plans[:20]]
    assert {p.task_text for p in other}.isdisjoint({p.task_text for p in plans})


def test_sessions_are_sorted_with_stable_ids(plans: list[SessionPlan]) -> None:
    assert 1800 < len(plans) < 2200  # Poisson, 20/s for 100 s
    assert [p.start for p in plans] == sorted(p.start for p in plans)
    assert [p.session_id for p in plans[:3]] == ["s000000", "s000001", "s000002"]
    assert len({p.session_id for p in plans}) == len(plans)


def test_flows_and_tenants_are_chosen_by_weight(plans: list[SessionPlan]) -> None:
    flows = Counter(p.flow for p in plans)
    assert _share_within(flows["agent"], len(plans), 3 / 5) and _share_within(flows["mix"], len(plans), 1 / 5)
    assert {p.tenant for p in plans if p.flow == "only-b"} == {"b"}
    agent = [p for p in plans if p.flow == "agent"]
    assert _share_within(sum(p.tenant == "a" for p in agent), len(agent), 3 / 4)
    assert {(p.tenant, p.api_key, p.workload) for p in plans} == {("a", "ka", "interactive"), ("b", "kb", None)}


def test_every_text_is_exactly_its_token_count(plans: list[SessionPlan]) -> None:
    agent = [p for p in plans if p.flow == "agent"]
    for plan in agent:
        planner, tool, coder = plan.steps
        assert isinstance(planner, CallPlan) and isinstance(tool, ToolPlan) and isinstance(coder, CallPlan)
        assert count_tokens(plan.task_text) == 50
        assert (planner.index, planner.model, planner.role, planner.max_tokens) == (0, "m1", "planner", 10)
        assert count_tokens(planner.system_text) == 100 and count_tokens(coder.system_text) == 70
        assert (tool.index, tool.tool, tool.latency_s) == (1, "search", 0.5) and count_tokens(tool.output_text) == 30
        assert coder.role == "m2" and 5 <= coder.max_tokens <= 40  # the role defaults to the model's name
        assert plan.think_s == 0.1
    # sd 50 around 20, clipped to [5, 40]: both bounds are hit, the middle is drawn.
    drawn = Counter(p.steps[2].max_tokens for p in agent)  # type: ignore[union-attr]
    assert drawn[5] > 50 and drawn[40] > 50 and len(drawn) > 20


def test_system_prompts_are_shared_and_tasks_are_unique(plans: list[SessionPlan]) -> None:
    agent = [p for p in plans if p.flow == "agent"]
    assert len({p.steps[0].system_text for p in agent}) == 1  # type: ignore[union-attr]
    assert agent[0].steps[0].system_text == system_text("planner", 100)  # type: ignore[union-attr]
    assert system_text("planner", 100) != system_text("coder", 100)
    assert len({p.task_text for p in plans}) == len(plans)
    assert len({p.task_text.split(" ")[1] for p in plans[: len(OUTPUT_VOCAB)]}) == min(len(plans), len(OUTPUT_VOCAB))


def test_a_mix_arrival_is_one_call_without_a_system_prompt(plans: list[SessionPlan]) -> None:
    mixed = [p for p in plans if p.flow == "mix"]
    for plan in mixed:
        [call] = plan.steps
        assert call == CallPlan(0, "m3", "", "", 8)
        assert 10 <= count_tokens(plan.task_text) <= 50 and plan.think_s == 0.0
    assert {count_tokens(p.task_text) for p in mixed} >= {10, 50}
    only_b = next(p for p in plans if p.flow == "only-b")
    assert only_b.steps == (CallPlan(0, "m1", "m1", "", 4),)  # system_tokens 0: no system message


def test_later_arrivals_never_change_earlier_sessions(spec: WorkloadSpec, plans: list[SessionPlan]) -> None:
    longer = msgspec.structs.replace(spec, arrivals=[*spec.arrivals, *parse_spec(SPEC.replace("rate: 20", "rate: 1")).arrivals])
    assert plan_sessions(longer)[: len(plans)] == plans


def test_duration_and_rate_scale_shape_the_arrivals(spec: WorkloadSpec, plans: list[SessionPlan]) -> None:
    capped = plan_sessions(spec, duration_s=10.0)
    assert capped == plans[: len(capped)] and plans[len(capped)].start >= 10.0
    doubled = plan_sessions(spec, rate_scale=2.0)
    assert abs(len(doubled) - 4000) <= 4 * math.sqrt(4000)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        plan_sessions(spec, seed=-1)
