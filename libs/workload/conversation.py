"""One session's conversation: the messages of its next call and their prompt token ids.

An agent's prompt grows by one message per step, and a long session asks for its prompt
many times; re-encoding the whole chat each time would make a simulation of long
sessions quadratic. Here every message is encoded once, when it joins the conversation
(system prompts once per process), and a prompt is the concatenation of its messages'
ids.

That is exact because `render_chat` ends every message with a newline and starts every
message, and the assistant cue, with `<`. No token of the tokenizer's pattern spans that
boundary: a token holding the newline is whitespace only, and `<` is not whitespace (the
optional space before a symbol is a space, never a newline). So the ids of a chat are
the ids of each message, each tokenized as if followed by `<`, then the cue's ids; a
property test checks this against `encode(render_chat(...))` over random conversations.

A trace row's task (`SessionPlan.task_prompt`) comes with its ids already known
(`trace_text.message_ids`: one lookup per word), and its text is only built if a live
call asks for the messages: a simulation of a trace never renders text at all.
"""

from __future__ import annotations

import functools

from tierflow.tokenizer import encode, render_chat
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan
from tierflow.workload.trace_text import TracePrompt, message_ids, prompt_text

__all__ = ["Conversation"]

_CUE_IDS: tuple[int, ...] = tuple(encode(render_chat([])))  # the assistant cue that ends every prompt


def _message_ids(role: str, content: str) -> tuple[int, ...]:
    """The ids one message adds to any prompt it is part of (see the module docstring)."""
    ids = encode(render_chat([(role, content)]))
    return tuple(ids[: len(ids) - len(_CUE_IDS)])


@functools.lru_cache(maxsize=1024)
def _system_ids(content: str) -> tuple[int, ...]:
    """System prompts repeat across every session of a role: encoded once per process."""
    return _message_ids("system", content)


class Conversation:
    """The task and the history of one session; the system prompt comes with each call.

    History grows by one rule (`record`): a model call appends the assistant's output, a
    tool step appends its output as a user message. Consumers must not add messages any
    other way, or the live fabric and the simulator would see different prompts.
    """

    def __init__(self, task_text: str) -> None:
        self._messages: list[tuple[str, str]] = [("user", task_text)]
        self._ids: list[int] = list(_message_ids("user", task_text))
        self._unrendered: TracePrompt | None = None  # a trace task whose text is not built yet

    @classmethod
    def for_plan(cls, plan: SessionPlan) -> Conversation:
        """The conversation `plan` starts with: its task text, or its trace row's prompt."""
        if plan.task_prompt is None:
            return cls(plan.task_text)
        conversation = cls.__new__(cls)
        conversation._messages = [("user", "")]
        conversation._ids = message_ids(plan.task_prompt)
        conversation._unrendered = plan.task_prompt
        return conversation

    def messages(self, system_text: str) -> list[dict[str, str]]:
        """The chat of the next call (a fresh list): the system prompt when set, the task, the history."""
        if self._unrendered is not None:
            self._messages[0] = ("user", prompt_text(self._unrendered))
            self._unrendered = None
        head = [{"role": "system", "content": system_text}] if system_text else []
        return head + [{"role": role, "content": content} for role, content in self._messages]

    def prompt_token_ids(self, system_text: str) -> list[int]:
        """Equal to `encode(render_chat(...))` of `messages(system_text)`, without re-encoding it."""
        head = list(_system_ids(system_text)) if system_text else []
        return head + self._ids + list(_CUE_IDS)

    def prompt_tokens(self, system_text: str) -> int:
        return (len(_system_ids(system_text)) if system_text else 0) + len(self._ids) + len(_CUE_IDS)

    def record(self, step: CallPlan | ToolPlan, output_text: str) -> None:
        """What `step` produced joins the history: a call's reply, a tool's result."""
        role = "assistant" if isinstance(step, CallPlan) else "user"
        self._messages.append((role, output_text))
        self._ids += _message_ids(role, output_text)
