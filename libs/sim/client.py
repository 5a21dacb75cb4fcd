"""The simulated client: session plans run as the live driver runs them, in virtual time.

The rules are the live driver's (`tierflow.workload.live`): sessions start open-loop at
their planned times; within a session the steps are closed-loop, `think_s` apart; a tool
step takes its latency, then its output joins the history; a call sends the
conversation's prompt (`Conversation.for_plan`) with `max_tokens` and ignore_eos, so
exactly `max_tokens` come back, and the reply joins the history; a call that fails ends
its session. The session the router keeps together, and the records name, is the plan's
`session_key`.

The reply's text is what the history needs of it: as many one-token words as came out.
A live reply is random words; here it is the first n words of one fixed sequence, so its
token ids are computed once per length rather than once per call (long agent sessions
would otherwise spend most of a simulation re-tokenizing replies). Which words they are
changes nothing a report measures: the prefix cache chains every block to the whole
prompt before it, so equal replies in different sessions never share a cached block.
"""

from __future__ import annotations

import functools
import random
from typing import Final

from tierflow.runtime.errors import TierflowError
from tierflow.tokenizer import OUTPUT_VOCAB, encode, render_chat
from tierflow.workload.conversation import Conversation
from tierflow.workload.records import RequestRecord
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan

__all__ = ["SessionRun", "reply", "ok_record", "failed_record", "REJECTED_STATUSES"]

REJECTED_STATUSES: Final = frozenset({429, 503})  # back-pressure and boundaries, as the live driver counts them
_WORDS: Final = random.Random(0x7E37).choices(OUTPUT_VOCAB, k=1 << 16)
_WORD_IDS: Final = encode("".join(_WORDS))  # one id per word: every OUTPUT_VOCAB word is one token


def _frame() -> tuple[list[int], list[int]]:
    """The ids an assistant message adds around its words: its role header, and the end of
    the message (rendered and encoded on its own, as `Conversation.record` encodes it)."""
    mark = " tierflowreply"  # tokenizes as any reply word does: a space and letters
    ids = encode(render_chat([("assistant", mark)]))
    at = ids.index(encode(mark)[0])
    return ids[:at], ids[at + 1 : len(ids) - len(encode(render_chat([])))]


_HEAD, _TAIL = _frame()


@functools.lru_cache(maxsize=256)
def reply(tokens: int) -> tuple[str, list[int]]:
    """A reply of `tokens` one-token words, and the ids it adds to every later prompt."""
    words, ids = _WORDS, _WORD_IDS
    if tokens > len(words):
        repeat = tokens // len(words) + 1
        words, ids = words * repeat, ids * repeat
    return "".join(words[:tokens]), _HEAD + ids[:tokens] + _TAIL


class SessionRun:
    """One session in progress: its plan, its conversation and the step it is at."""

    __slots__ = ("plan", "conversation", "position")

    def __init__(self, plan: SessionPlan) -> None:
        self.plan = plan
        self.conversation = Conversation.for_plan(plan)
        self.position = 0

    def next_step(self) -> CallPlan | ToolPlan | None:
        """The step to run now (None: the session is over); advances the position."""
        steps = self.plan.steps
        if self.position >= len(steps):
            return None
        step = steps[self.position]
        self.position += 1
        return step

    @property
    def pause(self) -> float:
        """Seconds between the end of one step and the start of the next (0 after the last)."""
        return self.plan.think_s if self.position < len(self.plan.steps) else 0.0

    def request_id(self, step: CallPlan) -> str:
        return f"{self.plan.session_id}-{step.index}"

    def record_reply(self, tokens: int) -> None:
        """The call's reply joins the history, as `Conversation.record` would add it (the
        ids come from `reply`'s cache instead of being encoded again)."""
        text, ids = reply(tokens)
        self.conversation.record_encoded("assistant", text, ids)


def ok_record(
    run: SessionRun, step: CallPlan, request_id: str, *, sent_at: float, first_token_at: float, finished_at: float,
    prompt_tokens: int, completion_tokens: int, cached_tokens: int, tier: str, node: str, energy_j: float = 0.0,
) -> RequestRecord:  # fmt: skip
    plan = run.plan
    return RequestRecord(
        request_id=request_id, session_id=plan.session_key, tenant=plan.tenant, flow=plan.flow, step=step.index,
        model=step.model, sent_at=sent_at, first_token_at=first_token_at, finished_at=finished_at,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_tokens=cached_tokens, tier=tier, node=node,
        energy_j=energy_j,
    )  # fmt: skip


def failed_record(run: SessionRun, step: CallPlan, request_id: str, *, sent_at: float, prompt_tokens: int, error: TierflowError) -> RequestRecord:
    """What the live driver records for an error answer: its status and the error's code
    (no node or tier: the live driver reads those from the headers of a successful answer)."""
    plan = run.plan
    status = error.http_status
    return RequestRecord(
        request_id=request_id, session_id=plan.session_key, tenant=plan.tenant, flow=plan.flow, step=step.index,
        model=step.model, sent_at=sent_at, prompt_tokens=prompt_tokens,
        outcome="rejected" if status in REJECTED_STATUSES else "error", status=status, error=error.code or error.error_type,
    )  # fmt: skip
