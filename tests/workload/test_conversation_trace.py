"""The conversation-shaped trace generator (loadtest/conversation_trace.py, issue 17): its shapes
are deterministic, conversations grow turn by turn over the previous turn's blocks, models
stick to sessions, and the reuse each shape shows is the one its structure implies."""

from __future__ import annotations

import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))

from conversation_trace import BLOCK, MAX_CONTEXT, MODELS, SHAPES, default_rate, for_file, generate, row_stats
from tierflow.workload.trace_export import write_trace
from tierflow.workload.traces import TraceRow, load_trace

MINUTES = 20.0


@pytest.fixture(scope="module")
def traces() -> dict[str, list[TraceRow]]:
    return {shape: generate(shape, MINUTES * 60.0, seed=11) for shape in SHAPES}


def _sessions(rows: list[TraceRow]) -> dict[str, list[TraceRow]]:
    out: dict[str, list[TraceRow]] = defaultdict(list)
    for row in rows:  # rows come by arrival, so each session's list is in turn order
        out[row.session_id].append(row)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_a_seed_fixes_the_trace(shape: str) -> None:
    first, again, other = generate(shape, 120.0, seed=3), generate(shape, 120.0, seed=3), generate(shape, 120.0, seed=4)
    assert first and first == again
    assert first != other


@pytest.mark.parametrize("shape", SHAPES)
def test_rows_come_by_arrival_within_the_span_and_fit_the_context(shape: str, traces: dict[str, list[TraceRow]]) -> None:
    rows = traces[shape]
    times = [r.timestamp for r in rows]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < MINUTES * 60_000
    assert all(r.input_length + r.output_length <= MAX_CONTEXT and r.output_length >= 1 for r in rows)
    assert all(len(r.hash_ids) == -(-r.input_length // BLOCK) for r in rows)  # every block named, the partial last one too


@pytest.mark.parametrize("shape", SHAPES)
def test_the_rate_is_about_the_one_asked_for(shape: str) -> None:
    rate = default_rate(shape) * 2
    rows = generate(shape, 600.0, seed=5, rate=rate)
    assert len(rows) == pytest.approx(rate * 600.0, rel=0.3)


@pytest.mark.parametrize("shape", ["conversation", "tool-agent", "chat"])
def test_each_turn_extends_the_previous_turn(shape: str, traces: dict[str, list[TraceRow]]) -> None:
    multi = [turns for turns in _sessions(traces[shape]).values() if len(turns) > 1]
    assert len(multi) > 20
    for turns in multi:
        for before, after in pairwise(turns):
            full = before.input_length // BLOCK
            assert after.hash_ids[:full] == before.hash_ids[:full]  # the previous turn's full blocks, as they were
            assert after.input_length >= before.input_length + before.output_length  # its prompt, its answer, then more
            if before.input_length % BLOCK:
                assert after.hash_ids[full] != before.hash_ids[full]  # the partial block was filled with new text


def test_conversations_wait_seconds_to_minutes_between_turns(traces: dict[str, list[TraceRow]]) -> None:
    gaps = np.array([
        (after.timestamp - before.timestamp) / 1000.0
        for turns in _sessions(traces["conversation"]).values()
        for before, after in pairwise(turns)
    ])  # fmt: skip
    assert 10.0 < float(np.median(gaps)) < 120.0
    assert float(gaps.min()) < 5.0 and float(gaps.max()) > 300.0  # heavy-tailed: seconds to minutes


def test_tool_agents_hop_seconds_apart(traces: dict[str, list[TraceRow]]) -> None:
    gaps = [(b.timestamp - a.timestamp) / 1000.0 for turns in _sessions(traces["tool-agent"]).values() for a, b in pairwise(turns)]
    assert float(np.median(gaps)) < 10.0


@pytest.mark.parametrize("shape", SHAPES)
def test_every_session_keeps_one_model_and_both_models_are_used(shape: str, traces: dict[str, list[TraceRow]]) -> None:
    sessions = _sessions(traces[shape])
    assert all(len({r.model for r in turns}) == 1 for turns in sessions.values())
    per_model = {m: sum(1 for turns in sessions.values() if turns[0].model == m) for m in MODELS}
    assert min(per_model.values()) > 0.3 * len(sessions)


def test_conversation_prompts_grow_long_and_heavy_tailed(traces: dict[str, list[TraceRow]]) -> None:
    tokens = np.array([r.input_length for r in traces["conversation"]])
    assert tokens.mean() > 1.3 * np.median(tokens)  # skewed to the right, as a lognormal is
    assert np.percentile(tokens, 99) > 5 * np.median(tokens)
    assert tokens.max() > 32_768  # contexts grow well past a 32k configuration


def _inherited_share(rows: list[TraceRow]) -> float:
    """Prompt tokens each turn inherits whole (the previous turn's full blocks) over all prompt tokens."""
    inherited = sum((before.input_length // BLOCK) * BLOCK for turns in _sessions(rows).values() for before, _ in pairwise(turns))
    return inherited / sum(r.input_length for r in rows)


def _shared_prefix_share(rows: list[TraceRow]) -> float:
    """Upper bound of what sessions share with each other: the blocks every session opens with
    that some other session also opened with, on each of a session's requests."""
    first_blocks: dict[int, int] = defaultdict(int)
    for turns in _sessions(rows).values():
        for block in set(turns[0].hash_ids):
            first_blocks[block] += 1
    shared = sum(BLOCK * sum(1 for b in r.hash_ids if first_blocks[b] > 1) for r in rows)
    return shared / sum(r.input_length for r in rows)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_reuse_is_what_the_structure_makes(shape: str, traces: dict[str, list[TraceRow]]) -> None:
    rows = traces[shape]
    reuse = row_stats(rows).prefix_reuse
    assert reuse is not None
    inherited, shared = _inherited_share(rows), _shared_prefix_share(rows)
    # trace_stats sees at least what turns inherit, and nothing beyond that and the shared openings
    assert inherited - 0.01 <= reuse <= inherited + shared + 0.01


def test_coding_reuses_little_beyond_its_system_prompt(traces: dict[str, list[TraceRow]]) -> None:
    rows = traces["coding"]
    system = BLOCK * len(rows) / sum(r.input_length for r in rows)  # one shared block per request
    reuse = row_stats(rows).prefix_reuse
    assert reuse is not None and reuse <= system + 1e-9 and reuse < 0.3
    assert reuse > 0.8 * system  # three system prompts, each seen again and again
    assert np.median([r.output_length for r in rows]) < 40  # tiny outputs
    assert all(len(turns) == 1 for turns in _sessions(rows).values())


def test_conversations_reuse_more_than_coding(traces: dict[str, list[TraceRow]]) -> None:
    conversation, coding = row_stats(traces["conversation"]).prefix_reuse, row_stats(traces["coding"]).prefix_reuse
    assert conversation is not None and coding is not None and conversation > coding + 0.2


def test_files_carry_the_model_and_sessions_only_when_asked(tmp_path: Path) -> None:
    rows = generate("chat", 60.0, seed=2)
    plain = load_trace(write_trace(for_file(rows, model_column=False), tmp_path / "plain.jsonl"))
    assert plain.format == "mooncake" and plain.model is None
    assert plain.hash_ids == [tuple(r.hash_ids) for r in rows] and plain.input_tokens.tolist() == [r.input_length for r in rows]
    modelled = load_trace(write_trace(for_file(rows), tmp_path / "model.jsonl"))
    assert modelled.format == "tierflow" and modelled.model == [r.model for r in rows] and set(modelled.session or []) == {""}
    sessions = load_trace(write_trace(for_file(rows, sessions=True), tmp_path / "sessions.jsonl"))
    assert sessions.session == [r.session_id for r in rows]
