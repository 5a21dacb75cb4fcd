"""A trace becomes session plans: its times cut and stretched, its rows thinned or copied, each sent to a fleet model."""

from __future__ import annotations

import numpy as np
import pytest

from tierflow.workload.replay import ReplayError, ReplayOptions, parse_window, plan_replay, replay_options
from tierflow.workload.sessions import CallPlan, SessionPlan
from tierflow.workload.spec import SpecError, TraceWindow, parse_spec
from tierflow.workload.traces import parse_trace

# Ten rows, one every 0.5 s; rows 0-4 open with block 100, rows 5-9 with block 200.
MOONCAKE = b"".join(
    f'{{"timestamp": {500 * i}, "input_length": {600 + 100 * i}, "output_length": {10 + i}, "hash_ids": [{100 if i < 5 else 200}, {i}]}}\n'.encode()
    for i in range(10)
)
MIX_SPEC = parse_spec("""\
name: replay
tenants: [{name: a, api_key: ka, weight: 1}, {name: b, api_key: kb, weight: 1, workload: batch}]
trace: {mix: [{model: small, weight: 1}, {model: large, weight: 1}]}
""")


def _call(plan: SessionPlan) -> CallPlan:
    call = plan.steps[0]
    assert isinstance(call, CallPlan) and len(plan.steps) == 1
    return call


def test_one_plan_per_row_with_the_rows_time_and_tokens() -> None:
    replay = plan_replay(parse_trace(MOONCAKE, source="m"), MIX_SPEC, ReplayOptions())
    plans = replay.plans
    assert [p.start for p in plans] == [0.5 * i for i in range(10)]
    assert [p.session_id for p in plans] == [f"r{i + 1}" for i in range(10)]  # named after the row's line
    assert [p.task_prompt.tokens for p in plans if p.task_prompt] == [600 + 100 * i for i in range(10)]
    assert [_call(p).max_tokens for p in plans] == [10 + i for i in range(10)]
    assert all(p.flow == "trace" and p.task_text == "" and p.think_s == 0.0 and p.user == "" for p in plans)
    assert replay.duration_s == 4.5
    # Sticky per first prefix block: rows that share block 100 share a model and a tenant.
    assert len({_call(p).model for p in plans[:5]}) == 1 and len({_call(p).model for p in plans[5:]}) == 1
    assert len({p.tenant for p in plans[:5]}) == 1
    assert {p.api_key for p in plans} <= {"ka", "kb"}


def test_window_and_speed() -> None:
    trace = parse_trace(MOONCAKE, source="m")
    replay = plan_replay(trace, MIX_SPEC, ReplayOptions(window_start_s=1.0, window_s=2.0, speed=4.0))
    assert [p.session_id for p in replay.plans] == ["r3", "r4", "r5", "r6"]  # trace seconds [1, 3)
    assert [p.start for p in replay.plans] == [0.0, 0.125, 0.25, 0.375]
    assert replay.duration_s == 0.5
    assert replay.summary.source.requests == 4 and replay.summary.sent.span_s == 0.375
    with pytest.raises(ReplayError, match="the window starts at 9 s, after the trace's last row"):
        plan_replay(trace, MIX_SPEC, ReplayOptions(window_start_s=9.0))
    with pytest.raises(ReplayError, match=r"no row of the trace arrives in the window \[1.1 s, 1.2 s\)"):
        plan_replay(trace, MIX_SPEC, ReplayOptions(window_start_s=1.1, window_s=0.1))


def test_rate_scale_thins_or_copies_rows_evenly_keeping_their_tokens() -> None:
    trace = parse_trace(MOONCAKE, source="m")
    half = plan_replay(trace, MIX_SPEC, ReplayOptions(rate_scale=0.5)).plans
    assert [p.session_id for p in half] == ["r2", "r4", "r6", "r8", "r10"]  # every other row, through the whole trace
    scaled = plan_replay(trace, MIX_SPEC, ReplayOptions(rate_scale=2.5))
    plans = scaled.plans
    assert len(plans) == 25  # floor(10 * 2.5)
    copies = {p.session_id: p for p in plans}
    assert [p.session_id for p in plans[:5]] == ["r1", "r1x1", "r2", "r2x1", "r2x2"]  # 2, 3, 2, 3 ... copies
    assert [p.start for p in plans[:5]] == pytest.approx([0.0, 0.25, 0.5, 0.5 + 0.5 / 3, 0.5 + 1.0 / 3])  # filling the gap to the next row
    row, copy = copies["r2"], copies["r2x1"]
    assert (row.task_prompt and copy.task_prompt) and row.task_prompt.tokens == copy.task_prompt.tokens == 700
    assert _call(row).max_tokens == _call(copy).max_tokens == 11
    assert row.task_prompt.hash_ids == copy.task_prompt.hash_ids and row.task_prompt.space != copy.task_prompt.space
    assert scaled.summary.sent.requests == 25 and scaled.summary.source.requests == 10


def test_rows_without_output_are_not_sent_and_short_ones_are_padded() -> None:
    trace = parse_trace(b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                        b"0,ChatGPT,5,3,8,API log\n1,ChatGPT,400,0,400,API log\n2,GPT-4,300,7,307,API log\n", source="b")  # fmt: skip
    spec = parse_spec("name: b\ntrace: {models: {ChatGPT: small, GPT-4: large}}\n")
    replay = plan_replay(trace, spec, ReplayOptions())
    assert [(_call(p).model, p.task_prompt and p.task_prompt.tokens, _call(p).max_tokens) for p in replay.plans] == [
        ("small", 13, 3),
        ("large", 300, 7),
    ]
    assert (replay.summary.zero_output_rows, replay.summary.padded_rows) == (1, 1)
    assert replay.summary.source.requests == 3 and replay.summary.sent.requests == 2
    assert replay.summary.models == {"large": 1, "small": 1}


def test_a_model_column_maps_through_the_table_and_names_without_an_entry_go_as_written() -> None:
    trace = parse_trace(b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n0,ChatGPT,50,3,53,API log\n1,GPT-4,50,3,53,API log\n", source="b")
    spec = parse_spec("name: b\ntrace: {models: {ChatGPT: small}}\n")
    assert [_call(p).model for p in plan_replay(trace, spec, ReplayOptions()).plans] == ["small", "GPT-4"]


def test_a_trace_without_models_needs_a_mix() -> None:
    with pytest.raises(ReplayError, match=r"the mooncake trace m has no model column \(first at line 1\): give the models"):
        plan_replay(parse_trace(MOONCAKE, source="m"), parse_spec("name: x\ntrace: {}\n"), ReplayOptions())


def test_the_fabrics_own_trace_keeps_sessions_and_tenants() -> None:
    data = (
        b'{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1], "model": "m1", "session_id": "acme:s1", "tenant": "acme"}\n'
        b'{"timestamp": 100, "input_length": 700, "output_length": 4, "hash_ids": [1], "model": "m1", "session_id": "acme:s1", "tenant": "acme"}\n'
        b'{"timestamp": 200, "input_length": 30, "output_length": 2, "model": "m2", "tenant": "ghost"}\n'
    )
    spec = parse_spec("name: own\ntenants: [{name: acme, api_key: sk-acme}, {name: other, api_key: sk-o}]\ntrace: {}\n")
    plans = plan_replay(parse_trace(data, source="own"), spec, ReplayOptions(rate_scale=2.0)).plans
    assert [(p.session_id, p.user, p.tenant, _call(p).model) for p in plans if p.session_id.startswith("r1") or p.session_id.startswith("r2")] == [
        ("r1", "acme:s1", "acme", "m1"), ("r1x1", "acme:s1x1", "acme", "m1"), ("r2", "acme:s1", "acme", "m1"), ("r2x1", "acme:s1x1", "acme", "m1"),
    ]  # fmt: skip
    assert all(p.session_key == (p.user or p.session_id) for p in plans)
    assert {p.tenant for p in plans if p.session_id.startswith("r3")} <= {"acme", "other"}  # an undeclared tenant: picked by weight


def test_picks_are_deterministic_per_seed_and_follow_the_weights() -> None:
    rows = b"".join(f'{{"timestamp": {i}, "input_length": 100, "output_length": 1, "hash_ids": [{i}]}}\n'.encode() for i in range(4000))
    trace = parse_trace(rows, source="many")
    spec = parse_spec("name: w\ntrace: {mix: [{model: a, weight: 3}, {model: b, weight: 1}]}\n")
    first = [_call(p).model for p in plan_replay(trace, spec, ReplayOptions(seed=1)).plans]
    assert first == [_call(p).model for p in plan_replay(trace, spec, ReplayOptions(seed=1)).plans]
    assert first != [_call(p).model for p in plan_replay(trace, spec, ReplayOptions(seed=2)).plans]
    assert first.count("a") / len(first) == pytest.approx(0.75, abs=0.03)


def test_the_summary_puts_the_trace_beside_what_is_sent() -> None:
    replay = plan_replay(parse_trace(MOONCAKE, source="m"), MIX_SPEC, ReplayOptions(speed=2.0, rate_scale=2.0))
    source, sent = replay.summary.source, replay.summary.sent
    assert (source.requests, source.span_s, source.rate_peak) == (10, 4.5, 2)
    assert source.rate_mean == pytest.approx(10 / 4.5)
    assert (sent.requests, sent.span_s) == (20, 2.25)  # the last row has no next one: its copy comes with it
    assert source.input_tokens.p50 == sent.input_tokens.p50 == 1050.0 and source.input_tokens.max == sent.input_tokens.max == 1500
    assert source.output_tokens.mean == sent.output_tokens.mean == 14.5
    assert source.prefix_reuse is not None and source.prefix_reuse == pytest.approx(sent.prefix_reuse or 0.0)
    # In each group of five rows, the four after the first find its 512-token block: in both copies alike.
    assert sent.prefix_reuse == pytest.approx(8 * 512 / sum(600 + 100 * i for i in range(10)))


def test_the_window_on_the_command_line() -> None:
    assert parse_window("600:600") == (600.0, 600.0)
    assert parse_window("1h:10m") == (3600.0, 600.0)
    assert parse_window("30m:") == (1800.0, None) and parse_window("90") == (90.0, None) and parse_window(":5s") == (0.0, 5.0)
    with pytest.raises(ReplayError, match="the duration 'ten' is not a number of seconds"):
        parse_window("0:ten")
    spec = parse_spec("name: w\ntrace: {window: {start_s: 5, duration_s: 60}, speed: 2, rate_scale: 3}\n")
    assert spec.trace is not None and spec.trace.window == TraceWindow(5.0, 60.0)
    assert replay_options(spec.trace, seed=1) == ReplayOptions(window_start_s=5.0, window_s=60.0, speed=2.0, rate_scale=3.0, seed=1)
    assert replay_options(spec.trace, seed=1, window=(0.0, None), speed=1.0) == ReplayOptions(rate_scale=3.0, seed=1)
    with pytest.raises(ReplayError, match="speed must be > 0"):
        ReplayOptions(speed=0.0)


def test_the_trace_section_of_a_spec_is_checked_by_path() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec("""\
name: t
arrivals: [{kind: steady, rate: 1, duration_s: 1}]
mix: {models: [{model: m}]}
trace: {format: parquet, mix: [], sticky: model, window: {start_s: -1}, speed: 0, extra: 1}
""")
    assert info.value.problems == [
        "$.trace.format: Invalid enum value 'parquet'",
        "$.trace.mix: needs at least one model",
        "$.trace.sticky: Invalid enum value 'model'",
        "$.trace.window.start_s: Expected `float` >= 0.0",
        "$.trace.speed: Expected `float` > 0.0",
        "$.trace.extra: unknown field (expected one of: file, format, models, mix, sticky, sticky_blocks, window, speed, rate_scale)",
        "$.arrivals: a trace replay takes its arrivals from the trace; remove `arrivals` (or `trace`)",
        "$.mix: a trace replay takes its calls from the trace; remove `mix` (or `trace`)",
    ]
    assert parse_spec("name: t\ntrace: {}\n").arrivals == []


def test_sticky_blocks_split_rows_below_a_shared_first_block() -> None:
    rows = b"".join(f'{{"timestamp": {i}, "input_length": 1100, "output_length": 1, "hash_ids": [0, {i}, {i}]}}\n'.encode() for i in range(200))
    trace = parse_trace(rows, source="common-system-prompt")
    one = parse_spec("name: s\ntrace: {mix: [{model: a}, {model: b}]}\n")
    two = parse_spec("name: s\ntrace: {mix: [{model: a}, {model: b}], sticky_blocks: 2}\n")
    assert len({_call(p).model for p in plan_replay(trace, one, ReplayOptions()).plans}) == 1
    models = [_call(p).model for p in plan_replay(trace, two, ReplayOptions()).plans]
    assert 60 < models.count("a") < 140
    assert np.isclose(plan_replay(trace, two, ReplayOptions()).summary.sent.prefix_reuse or 0.0, 512 * 198 / (1100 * 200))
