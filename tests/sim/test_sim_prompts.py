"""A simulated call carries its prompt's length and hashes; its ids exist only when the engines read them."""

from __future__ import annotations

import pytest

from tierflow.rdu import block_hashes
from tierflow.rdu.kvcache import pack_tokens
from tierflow.sim import SimConfig, simulate
from tierflow.sim.calls import PromptLength
from tierflow.sim.client import SessionRun, reply
from tierflow.workload import trace_text
from tierflow.workload.conversation import Conversation
from tierflow.workload.records import RequestRecord
from tierflow.workload.replay import ReplayOptions, plan_replay
from tierflow.workload.sessions import CallPlan, SessionPlan
from tierflow.workload.spec import parse_spec
from tierflow.workload.traces import parse_trace

from sim_helpers import fleet_of

FLEET = """\
models:
  - {name: small, versions: [{version: v1, catalog: llama-3.1-8b}]}
bundles:
  - name: one
    models: [{model: small, config: ss8192-bs4}]
deployments:
  - {name: one, bundle: one, replicas: 2, min_replicas: 2, max_replicas: 2, profile: sn40l-16}
"""

# Rows close enough to overlap, sharing prefixes every way: whole prompts, trunks with
# branches, rows ending inside or at the edge of a shared block, rows with no ids.
ROWS = [
    (0, 4000, [1, 2, 3, 4, 5, 6, 7, 8]), (300, 4000, [1, 2, 3, 4, 5, 6, 7, 8]), (500, 2600, [1, 2, 3, 9, 10, 11]),
    (900, 1100, [1, 2, 12]), (1000, 1031, [1, 2, 13]), (1500, 1600, [1, 2, 3, 14]), (1700, 2600, [1, 2, 3, 9, 10, 15]),
    (2100, 575, [20, 21]), (2200, 575, [20, 21]), (2600, 1024, [1, 2]), (3000, 3000, []), (3100, 700, [1, 40]),
    (3500, 519, [50]), (3600, 13, []), (4000, 7000, [1, 2, 3, 4, 5, 6, 7, 8, 60, 61, 62, 63, 64, 65]),
]  # fmt: skip


def _replay(**config: object) -> list[RequestRecord]:
    data = b"".join(f'{{"timestamp": {t}, "input_length": {i}, "output_length": 6, "hash_ids": {ids}}}\n'.encode() for t, i, ids in ROWS)
    spec = parse_spec("name: shared\ntrace: {mix: [{model: small}]}\n")
    replay = plan_replay(parse_trace(data, source="shared.jsonl"), spec, ReplayOptions(rate_scale=2.0))
    records = simulate(spec, fleet_of(FLEET), SimConfig(autoscale=False, **config), plans=replay.plans).records  # type: ignore[arg-type]
    return sorted(records, key=lambda r: r.request_id)


def test_a_replay_without_ids_gives_the_records_hashing_the_ids_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_: trace_text.TracePrompt) -> list[int]:
        raise AssertionError("a fast replay built a prompt's ids")

    with monkeypatch.context() as patch:
        patch.setattr(trace_text, "message_ids", refuse)
        fast = _replay()
    with monkeypatch.context() as patch:
        patch.setattr(Conversation, "prompt_block_hashes", lambda self, system, size: block_hashes(self.prompt_token_ids(system), size))
        from_ids = _replay()
    assert len(fast) == 2 * len(ROWS) and all(r.outcome == "ok" for r in fast)
    assert sum(r.cached_tokens for r in fast) > 0
    assert fast == from_ids


def test_a_replay_with_token_events_reads_the_ids_and_agrees_to_the_last_bit() -> None:
    """The engines read the ids only with per-token events (the completion's draw): then
    the calls carry them, and every record is the one the fast replay has."""
    assert _replay(token_events=True) == _replay()


def test_a_prompt_length_can_be_measured_not_read() -> None:
    prompt = PromptLength(8600)
    assert len(prompt) == 8600 and prompt
    for read in (lambda: prompt[0], lambda: list(prompt), lambda: pack_tokens(prompt)):
        with pytest.raises(RuntimeError, match="token_events"):
            read()


def test_a_reply_joins_the_history_as_record_adds_it() -> None:
    plan = SessionPlan("s", "t", "k", None, "f", 0.0, " the task", (CallPlan(0, "m", "", "", 5),), 0.0)
    run, expected = SessionRun(plan), Conversation(" the task")
    run.record_reply(5)
    expected.record(plan.calls[0], reply(5)[0])
    assert run.conversation.messages(" sys") == expected.messages(" sys")
    assert run.conversation.prompt_token_ids(" sys") == expected.prompt_token_ids(" sys")
    assert run.conversation.prompt_block_hashes(" sys", 64) == block_hashes(expected.prompt_token_ids(" sys"), 64)
