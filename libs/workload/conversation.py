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

A trace row's task (`SessionPlan.task_prompt`) is synthesized on use: its ids
(`trace_text.message_ids`: one lookup per word) only when a prompt's ids are asked for,
its text only when a live call asks for the messages. A simulation of a trace needs
neither: a call's length is arithmetic (`prompt_tokens`) and a one-message prompt's
block hashes come from `trace_text.prompt_block_hashes` (`prompt_block_hashes`), which
reuses the hashes of the prefix blocks that rows share.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tierflow.rdu.kvcache import block_hashes
from tierflow.tokenizer import encode, render_chat
from tierflow.workload import trace_text
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan
from tierflow.workload.trace_text import TracePrompt

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

    The ids are kept in two parts, the task's and the history's, so that a trace task's
    ids can wait until a prompt's ids are asked for while the history grows.
    """

    def __init__(self, task_text: str) -> None:
        self._messages: list[tuple[str, str]] = [("user", task_text)]
        self._task_ids: list[int] | None = list(_message_ids("user", task_text))  # None: a trace task's, not built yet
        self._history_ids: list[int] = []
        self._trace: TracePrompt | None = None  # the trace row the task is, if it is one
        self._unrendered: TracePrompt | None = None  # a trace task whose text is not built yet

    @classmethod
    def for_plan(cls, plan: SessionPlan) -> Conversation:
        """The conversation `plan` starts with: its task text, or its trace row's prompt
        (neither its ids nor its text built yet)."""
        if plan.task_prompt is None:
            return cls(plan.task_text)
        conversation = cls.__new__(cls)
        conversation._messages = [("user", "")]
        conversation._task_ids = None
        conversation._history_ids = []
        conversation._trace = conversation._unrendered = plan.task_prompt
        return conversation

    def messages(self, system_text: str) -> list[dict[str, str]]:
        """The chat of the next call (a fresh list): the system prompt when set, the task, the history."""
        if self._unrendered is not None:
            self._messages[0] = ("user", trace_text.prompt_text(self._unrendered))
            self._unrendered = None
        head = [{"role": "system", "content": system_text}] if system_text else []
        return head + [{"role": role, "content": content} for role, content in self._messages]

    def prompt_token_ids(self, system_text: str) -> list[int]:
        """Equal to `encode(render_chat(...))` of `messages(system_text)`, without re-encoding it."""
        head = list(_system_ids(system_text)) if system_text else []
        return head + self._task() + self._history_ids + list(_CUE_IDS)

    def prompt_tokens(self, system_text: str) -> int:
        """`len(prompt_token_ids(system_text))`, without building the ids."""
        return (len(_system_ids(system_text)) if system_text else 0) + self._task_tokens() + len(self._history_ids) + len(_CUE_IDS)

    def prompt_block_hashes(self, system_text: str, block_size: int) -> list[int]:
        """Equal to `tierflow.rdu.block_hashes(prompt_token_ids(system_text), block_size)`.

        A trace task alone (no system prompt, no history yet: every call of a replay) is
        the trace row's prompt exactly, so its hashes come from the trace's blocks without
        building its ids (`trace_text.prompt_block_hashes`); any other prompt is hashed
        from its ids."""
        if self._trace is not None and not system_text and len(self._messages) == 1:
            return trace_text.prompt_block_hashes(self._trace, block_size)
        return block_hashes(self.prompt_token_ids(system_text), block_size)

    def record(self, step: CallPlan | ToolPlan, output_text: str) -> None:
        """What `step` produced joins the history: a call's reply, a tool's result."""
        role = "assistant" if isinstance(step, CallPlan) else "user"
        self.record_encoded(role, output_text, _message_ids(role, output_text))

    def record_encoded(self, role: str, content: str, ids: Sequence[int]) -> None:
        """A message joins the history with the ids the caller already has for it, which
        must be what `record` would encode (the simulator's replies, cached per length)."""
        self._messages.append((role, content))
        self._history_ids += ids

    def _task(self) -> list[int]:
        """The task's ids, built on first use for a trace task."""
        if self._task_ids is None:
            assert self._trace is not None
            self._task_ids = trace_text.message_ids(self._trace)
        return self._task_ids

    def _task_tokens(self) -> int:
        """How many ids the task adds, without building a trace task's."""
        if self._task_ids is not None:
            return len(self._task_ids)
        assert self._trace is not None
        return trace_text.message_tokens(self._trace)
