"""Conversation: incremental prompt ids equal a full re-encode of the rendered chat, for any history."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.tokenizer import encode, render_chat
from tierflow.workload.conversation import Conversation
from tierflow.workload.sessions import CallPlan, ToolPlan, system_text

CALL = CallPlan(0, "m", "planner", "", 8)
TOOL = ToolPlan(1, "search", 0.0, "")

# Text that stresses the boundaries between messages: runs of whitespace (which the
# tokenizer's pattern treats differently before a non-space), the template's own `<|>`,
# digits, unicode and empty strings, mixed with arbitrary text.
_EDGY = st.lists(st.sampled_from([" ", "  ", "\n", "\t", "\r", "<", "|", ">", "a", "Zq", "123", "4567", "é", ".", "\u3000"]), max_size=20).map("".join)
TEXT = st.one_of(_EDGY, st.text(max_size=30))


def _reference(messages: list[dict[str, str]]) -> list[int]:
    return encode(render_chat([(m["role"], m["content"]) for m in messages]))


@settings(max_examples=400, deadline=None)
@given(task=TEXT, systems=st.lists(TEXT, min_size=1, max_size=3), steps=st.lists(st.tuples(st.booleans(), TEXT), max_size=6))
def test_prompt_ids_equal_encoding_the_rendered_chat(task: str, systems: list[str], steps: list[tuple[bool, str]]) -> None:
    conversation = Conversation(task)
    for is_call, output in [(True, ""), *steps]:
        for system in systems:
            messages = conversation.messages(system)
            ids = conversation.prompt_token_ids(system)
            assert ids == _reference(messages)
            assert conversation.prompt_tokens(system) == len(ids)
        conversation.record(CALL if is_call else TOOL, output)


def test_messages_follow_the_one_history_rule() -> None:
    conversation = Conversation(" the task")
    assert conversation.messages("") == [{"role": "user", "content": " the task"}]
    conversation.record(CALL, " planned")
    conversation.record(TOOL, " found")
    assert conversation.messages(" be brief") == [
        {"role": "system", "content": " be brief"},
        {"role": "user", "content": " the task"},
        {"role": "assistant", "content": " planned"},
        {"role": "user", "content": " found"},
    ]
    # Callers get fresh lists: changing one never changes the conversation.
    conversation.messages("")[0]["content"] = "changed"
    assert conversation.messages("")[0]["content"] == " the task"


def test_prompt_sizes_of_one_token_words_are_exact() -> None:
    """The template adds 6 tokens per message (`<|role|>` and two newlines) and 6 for the assistant cue."""
    system = system_text("planner", 100)
    conversation = Conversation(system_text("task", 50))
    assert conversation.prompt_tokens("") == 6 + 50 + 1 + 6
    assert conversation.prompt_tokens(system) == (6 + 100 + 1) + (6 + 50 + 1) + 6
    conversation.record(CALL, system_text("reply", 10))
    assert conversation.prompt_tokens(system) == (6 + 100 + 1) + (6 + 50 + 1) + (6 + 10 + 1) + 6
