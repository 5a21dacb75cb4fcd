"""Workload specs: the documented shape parses; every problem of a bad file is reported at once, by path."""

from __future__ import annotations

from pathlib import Path

import pytest

import tierflow.workload.spec as spec_module
from tierflow.workload.spec import Arrival, CallStep, Distribution, SpecError, TenantSpec, ToolStep, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def _documented_example() -> str:
    """The YAML block of spec.py's module docstring: the documentation must stay true."""
    doc = spec_module.__doc__
    assert doc is not None
    block = doc.split("\n\n")[1]
    return "\n".join(line[4:] for line in block.splitlines())


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    return info.value.problems


def test_the_documented_example_parses_with_steps_typed_by_their_key() -> None:
    spec = parse_spec(_documented_example())
    assert spec.name == "agentic-small" and spec.duration_s == 600 and spec.seed == 7
    assert [t.name for t in spec.tenants] == ["acme", "batchco"] and spec.tenants[0].weight == 3.0
    flow = spec.flows[0]
    assert [type(s) for s in flow.steps] == [CallStep, ToolStep, CallStep, CallStep]
    assert flow.steps[1] == ToolStep(tool="search", latency_s=0.5, output_tokens=200)
    assert flow.steps[0] == CallStep(model="planner", role="planner", system_tokens=400, max_tokens=64)
    assert spec.mix is not None and spec.mix.prompt_tokens == Distribution(mean=800, sd=200)
    assert [a.kind for a in spec.arrivals] == ["poisson", "bursts", "diurnal", "steady"]
    assert spec.slo.ttft_ms == 2000 and spec.slo.itl_ms == 150


@pytest.mark.parametrize("name", ["agentic-small.yaml", "agentic.yaml"])
def test_shipped_specs_load(name: str) -> None:
    spec = load_spec(REPO / "loadtest" / "specs" / name)
    assert spec.flows and spec.arrivals


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_spec("name: m\narrivals: [{kind: steady, rate: 1, duration_s: 5}]\nmix: {models: [{model: x}]}\n")
    assert spec.tenants == [TenantSpec(name="default")] and spec.flows == [] and spec.seed == 0
    assert spec.arrivals == [Arrival(kind="steady", rate=1.0, duration_s=5.0)]


BAD = """\
name: broken
seed: -1
tenants:
  - {name: a, weight: 0}
  - {name: a}
  - {nam: b}
flows:
  - name: f
    tenants: [a, zz]
    task_tokens: {mean: 10, min: 5, max: 3}
    steps:
      - {model: m, tool: t}
      - {}
      - {model: m, max_tokens: 0}
      - {tool: t, latency_s: -1}
      - 5
  - name: mix
    steps: []
  - name: f
    steps: [{model: q}]
arrivals:
  - {kind: bursts, rate: 1, duration_s: 10, burst_rate: 3, every_s: 5, burst_s: 6}
  - {kind: bursts, rate: 1, duration_s: 10}
  - {kind: diurnal, rate: 1, duration_s: 10}
  - {kind: poisson, rate: 1, duration_s: 10, period_s: 3}
  - {kind: wave, rate: 1, duration_s: 10}
bogus: 1
"""


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    assert _problems(BAD) == [
        "$.seed: Expected `int` >= 0",
        "$.tenants[0].weight: Expected `float` > 0.0",
        "$.tenants[2].nam: unknown field (expected one of: name, api_key, weight, workload, request_class)",
        "$.tenants[2]: missing required field `name`",
        "$.tenants: the tenant name 'a' is declared 2 times; names must be unique",
        "$.flows[0].tenants[1]: no tenant is named 'zz' (declared: a)",
        "$.flows[0].task_tokens: max (3) is below min (5); a draw is clipped to [min, max]",
        "$.flows[0].steps[0]: has both `model` and `tool`; a step is a model call (`model`) or a tool step (`tool`)",
        "$.flows[0].steps[1]: has neither `model` nor `tool`; a step is a model call (`model`) or a tool step (`tool`)",
        "$.flows[0].steps[2].max_tokens: Expected `int` >= 1",
        "$.flows[0].steps[3].latency_s: Expected `float` >= 0.0",
        "$.flows[0].steps[4]: expected a mapping with `model` (a model call) or `tool` (a tool step); got a number",
        "$.flows[1].name: the flow name 'mix' is reserved for the single calls of `mix`; choose another",
        "$.flows[1].steps: needs at least one step",
        "$.flows: the flow name 'f' is declared 2 times; names must be unique",
        "$.arrivals[0]: burst_s (6) must be shorter than every_s (5): a burst is part of each cycle",
        "$.arrivals[1]: kind 'bursts' needs burst_rate, every_s and burst_s (missing: burst_rate, every_s, burst_s)",
        "$.arrivals[2]: kind 'diurnal' needs period_s (the length of one cycle, in seconds)",
        "$.arrivals[3]: kind 'poisson' takes no period_s (a diurnal field)",
        "$.arrivals[4].kind: Invalid enum value 'wave'",
        "$.bogus: unknown field (expected one of: name, arrivals, tenants, flows, mix, slo, seed, duration_s, trace)",
    ]


def test_the_error_message_lists_the_problems_for_people() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(BAD)
    assert str(info.value).startswith("invalid workload spec:\n  - $.seed: Expected `int` >= 0\n")


def test_required_sections_and_something_to_run() -> None:
    assert _problems("flows: []\n") == [
        "$: missing required field `name`",
        "$: missing required field `arrivals`",
        "$: nothing to run; declare at least one flow under `flows` or a model mix under `mix`",
    ]
    assert _problems("name: x\narrivals: []\ntenants: []\nmix: {models: []}\n") == [
        "$.arrivals: needs at least one arrival phase",
        "$.tenants: needs at least one tenant",
        "$.mix.models: needs at least one model",
    ]


def test_flow_tenants_default_to_the_default_tenant_and_may_not_be_empty() -> None:
    base = "name: x\narrivals: [{kind: steady, rate: 1, duration_s: 1}]\nflows:\n  - name: f\n    steps: [{model: m}]\n"
    assert parse_spec(base + "    tenants: [default]\n").flows[0].tenants == ["default"]
    assert _problems(base + "    tenants: []\n") == ["$.flows[0].tenants: names no tenant; leave `tenants` out to let every tenant run this flow"]


def test_sections_of_the_wrong_shape() -> None:
    assert _problems("name: x\narrivals: {kind: steady}\nflows: 3\nslo: {ttft_ms: 0}\n") == [
        "$.arrivals: expected a list of arrival phases; got a mapping",
        "$.flows: expected a list of flows; got a number",
        "$.slo.ttft_ms: Expected `float` > 0.0",
    ]


def test_not_yaml_or_not_a_mapping() -> None:
    assert _problems("") == ["$: workload spec must be a mapping with name, arrivals and flows or mix; got nothing"]
    assert _problems("- 1\n") == ["$: workload spec must be a mapping with name, arrivals and flows or mix; got a list"]
    [problem] = _problems("a: [1\n")
    assert problem.startswith("workload spec: not valid YAML: ")


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert info.value.problems == [f"{missing}: cannot read: No such file or directory"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("[")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert info.value.problems[0].startswith(f"{bad}: not valid YAML")


def test_structs_check_themselves_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="max \\(2\\) is below min \\(3\\)"):
        Distribution(mean=5, min=3, max=2)
    with pytest.raises(ValueError, match="kind 'steady' takes no burst_rate \\(a bursts field\\), amplitude \\(a diurnal field\\)"):
        Arrival(kind="steady", rate=1, duration_s=1, burst_rate=2, amplitude=0.5)
