"""Conversation.prompt_block_hashes equals hashing its prompt's ids; a trace task's ids wait until asked for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.rdu import block_hashes
from tierflow.tokenizer import encode, render_chat
from tierflow.workload import trace_text
from tierflow.workload.conversation import Conversation
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan
from tierflow.workload.trace_text import TracePrompt

CALL = CallPlan(0, "m", "", "", 4)
TOOL = ToolPlan(1, "search", 0.0, "")
SYSTEMS = ["", " be brief", " you plan\n steps"]


def _trace_conversation(prompt: TracePrompt) -> Conversation:
    plan = SessionPlan("r1", "t", "k", None, "trace", 0.0, "", (CALL,), 0.0, task_prompt=prompt)
    return Conversation.for_plan(plan)


def _check(conversation: Conversation, system: str) -> None:
    ids = conversation.prompt_token_ids(system)
    assert conversation.prompt_tokens(system) == len(ids)
    for block_size in (16, 64, 100):
        assert conversation.prompt_block_hashes(system, block_size) == block_hashes(ids, block_size)


@pytest.mark.parametrize("tokens", [0, 13, 70, 519, 1031, 2600])
def test_a_trace_conversation_hashes_as_its_ids_with_and_without_system_text_and_history(tokens: int) -> None:
    conversation = _trace_conversation(TracePrompt(tokens, (5, 6, 7), row=4, space=9))
    for system in SYSTEMS:
        _check(conversation, system)
    conversation.record(CALL, " ba be bi")
    conversation.record(TOOL, "")
    conversation.record_encoded("assistant", " bo", encode(render_chat([("assistant", " bo")]))[: -len(encode(render_chat([])))])
    for system in SYSTEMS:
        _check(conversation, system)
    chat = [(m["role"], m["content"]) for m in conversation.messages(" be brief")]
    assert conversation.prompt_token_ids(" be brief") == encode(render_chat(chat))


def test_a_trace_task_builds_no_ids_until_they_are_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = TracePrompt(3000, (1, 2, 3), row=8, space=0)
    ids = trace_text.prompt_token_ids(prompt)

    def refuse(_: TracePrompt) -> list[int]:
        raise AssertionError("the task's ids were built")

    with monkeypatch.context() as patch:
        patch.setattr(trace_text, "message_ids", refuse)
        patch.setattr(trace_text, "prompt_token_ids", refuse)
        conversation = _trace_conversation(prompt)
        assert conversation.prompt_tokens("") == 3000
        assert conversation.prompt_block_hashes("", 64) == block_hashes(ids, 64)
        assert conversation.messages("")[0]["content"] == trace_text.prompt_text(prompt)  # text, still no ids
        assert conversation.prompt_block_hashes("", 64) == block_hashes(ids, 64)  # rendered: still the fast path
        conversation.record(CALL, " ba")  # history joins without them too
        chat = [(m["role"], m["content"]) for m in conversation.messages(" sys")]
        assert conversation.prompt_tokens(" sys") == len(encode(render_chat(chat)))
    task = trace_text.message_ids(prompt)
    assert conversation.prompt_token_ids("")[: len(task)] == task  # built on first use, ahead of the history
    _check(conversation, "")
    _check(conversation, " sys")


TEXT = st.lists(st.sampled_from([" ", "\n", "<", "|", ">", "a", "Zq", "12", "é"]), max_size=20).map("".join)


@settings(max_examples=150, deadline=None)
@given(task=TEXT, system=st.sampled_from(SYSTEMS), steps=st.lists(st.tuples(st.booleans(), TEXT), max_size=4))
def test_a_text_conversation_hashes_as_its_ids(task: str, system: str, steps: list[tuple[bool, str]]) -> None:
    conversation = Conversation(task)
    _check(conversation, system)
    for is_call, output in steps:
        conversation.record(CALL if is_call else TOOL, output)
        _check(conversation, system)
