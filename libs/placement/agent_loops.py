"""Agent-loop policing: a session whose prompts grow without bound is noticed and capped.

An agent loop sends its whole history back with every step, so a loop that never
summarizes costs more each step, for ever (SambaNova's "unbounded prompt growth"). The
router sees every step of a session (tenant + `x-session-id` header or `user`, see
`sessions.session_key`), so it can tell; this module decides, per step, what the
session's tenant's `AgentLoopPolicy` says about it. Pure: `now` is passed in, nothing is
read or sent; the dispatcher raises the refusal, sets the header and publishes the event.

Per session the tracker keeps (`_Session`, a few hundred bytes): steps, total tokens
(prompts at admission, completions at settle), the longest prompt, the last `window`
prompt sizes and how much of each prompt repeated the step before. "Repeated" is the
prompt's leading 512-token blocks equal to the previous step's (the router's trace block
ids, `RequestRecord.hash_ids`: chained hashes, so equal at block i means equal up to i,
and the common prefix is a binary search). Long prompts keep a sample of at most
`_SAMPLES` ids, so the count is a lower bound within 1/`_SAMPLES` of the prompt.

Limits (all optional, per tenant):

    max_steps            steps per session: step max_steps + 1 is over
    max_session_tokens   prompt + completion tokens: a step whose prompt would take the
                         session past it is over (its completion is not known yet, so a
                         session ends at most one completion past the budget)
    max_prompt_tokens    one prompt's tokens
    runaway              over the last `window` steps the prompt grew by more than
                         `min_growth` tokens a step on average, while every one of those
                         prompts repeated at least `min_repeated` of itself from the step
                         before: the loop re-sends a history that only grows

and what a step over a limit gets (`action`; the runaway detector may have its own):

    warn       served, with `x-tierflow-agent-loop: <limit>; action=warn; steps=..; tokens=..`
    reject     403 `agent_loop_limit` naming the policy and the limit: the session is capped
               (every later step is over too, until the session is idle for `idle_s`)
    summarize  only a step whose prompt is short again (at most `summarize_below` of the
               session's longest) is served: a summarization. It starts the session's
               budget afresh. Any other step gets 403 `summarization_required` saying how short.

Why 403 and not 429: waiting does not help (the session stays over until the client
changes what it sends), and the OpenAI SDKs retry a 429 on their own, so a 429 would
triple the refused load and delay the error the agent needs to see.

Tenants without `agent_loops` are watched with `WATCH`: the runaway detector only,
warning. Its defaults never flag a session of the held-in agentic spec
(loadtest/specs/agentic.yaml; tests/placement/test_agent_loops.py checks every session
of a 15-minute run): those sessions have at most five calls, each a different role's
system prompt first, so no step repeats the one before; a loop must run `window` = 8
steps, each adding more than 512 tokens, each re-sending at least 80% of itself.

Bounded memory: a session idle for `idle_s` is forgotten (checked at each step, oldest
first: the table is in order of last step), and at most `capacity` sessions are kept
(the least recently active goes first), as `SessionTable` bounds itself. A session
forgotten starts again from nothing: the limits are a guard against runaway loops, not
an accounting (the tenant's token quota is that).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from tierflow.runtime.errors import PermissionDenied

__all__ = [
    "Action",
    "AgentLoopPolicy",
    "AgentLoopTracker",
    "BLOCK_TOKENS",
    "LIMITS",
    "RunawayPolicy",
    "Verdict",
    "WATCH",
]

Action = Literal["warn", "reject", "summarize"]
LIMITS: Final = ("max_steps", "max_session_tokens", "max_prompt_tokens", "runaway")  # metric label values
BLOCK_TOKENS: Final = 512  # tokens per hash id (tierflow.workload.trace_text.TRACE_BLOCK_TOKENS)
_SAMPLES: Final = 32  # hash ids kept of the previous prompt (longer prompts: an even sample)
_STRENGTH: Final = {"warn": 0, "summarize": 1, "reject": 2}  # several limits over: the strongest action wins


class RunawayPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The runaway detector: a prompt that keeps growing while re-sending its history."""

    window: Annotated[int, Meta(ge=2, le=64)] = 8  # steps looked back over
    min_growth: Annotated[float, Meta(gt=0.0)] = 512.0  # tokens per step, averaged over the window
    min_repeated: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.8  # share of each prompt equal to the step before
    action: Action | None = None  # None: the policy's action


class AgentLoopPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One tenant's limits on an agent session (a session: the `x-session-id` header or `user`).

    As YAML: `agent_loops: {max_steps: 50, max_session_tokens: 2000000, action: reject,
    runaway: {window: 8, min_growth: 512, min_repeated: 0.8, action: warn}}`;
    `runaway: null` turns the detector off."""

    max_steps: Annotated[int, Meta(gt=0)] | None = None
    max_session_tokens: Annotated[int, Meta(gt=0)] | None = None
    max_prompt_tokens: Annotated[int, Meta(gt=0)] | None = None
    runaway: RunawayPolicy | None = RunawayPolicy()
    action: Action = "reject"
    summarize_below: Annotated[float, Meta(gt=0.0, lt=1.0)] = 0.5  # of the session's longest prompt

    @property
    def inert(self) -> bool:
        """Nothing to check: the session need not be tracked at all."""
        return self.runaway is None and self.max_steps is None and self.max_session_tokens is None and self.max_prompt_tokens is None


WATCH: Final = AgentLoopPolicy(action="warn")
"""Tenants without `agent_loops`: runaway loops are noticed (header, metric, event), never refused."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy says about one step that was over a limit, or a summarization.

    `event`: "flagged" (the session's first step over a limit, served: warn), "capped"
    (its first step refused), or "" (already said). `error`: raise it (None: serve)."""

    limit: str  # one of LIMITS, or "summarized"
    action: str  # "warn" | "reject" | "summarize"
    steps: int  # the session's steps with this one (since its last summarization)
    tokens: int  # its tokens with this prompt
    prompt_tokens: int
    growth: float  # prompt tokens per step over the recent window
    repeated: float  # share of this prompt equal to the step before
    event: str
    header: str  # x-tierflow-agent-loop
    error: PermissionDenied | None = None


class _Session:
    __slots__ = ("steps", "tokens", "peak", "sizes", "shares", "prev", "stride", "seen", "flagged", "capped")

    def __init__(self, now: float) -> None:
        self.steps = 0
        self.tokens = 0
        self.peak = 0  # the longest prompt since the last summarization
        self.sizes: list[int] = []  # the last `window` prompt sizes, oldest first
        self.shares: list[int] = []  # the last `window` - 1 repeated shares, in percent
        self.prev: Sequence[int] = ()  # the previous prompt's hash ids (every `stride`-th)
        self.stride = 1
        self.seen = now
        self.flagged = False
        self.capped = False

    def restart(self) -> None:
        """A summarization: the budget starts afresh (the hash ids stay, for the next step)."""
        self.steps = self.tokens = self.peak = 0
        self.sizes, self.shares = [], []
        self.flagged = self.capped = False


_FRESH: Final = _Session(0.0)  # a session with nothing counted yet (read only)


def _common_blocks(prev: Sequence[int], stride: int, ids: Sequence[int]) -> int:
    """How many leading blocks `ids` shares with the prompt `prev` sampled (every `stride`-th
    id, the last of each stride): chained hashes match on a prefix, so bisect for its end
    (a lower bound within `stride` blocks)."""
    lo, hi = 0, min(len(prev), len(ids) // stride)  # prev[:lo] matches; the first mismatch is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if prev[mid] == ids[(mid + 1) * stride - 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo * stride


def _sample(ids: Sequence[int]) -> tuple[Sequence[int], int]:
    if len(ids) <= _SAMPLES:
        return ids, 1  # the caller's list, shared: read only
    stride = -(-len(ids) // _SAMPLES)
    return tuple(ids[stride - 1 :: stride]), stride


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


class AgentLoopTracker:
    """Every session's steps, tokens and prompt growth, judged against its tenant's policy.

    `check` at admission (it counts the step unless it refuses it), `settle` when the
    step's completion is known."""

    __slots__ = ("capacity", "idle_s", "_sessions")

    def __init__(self, capacity: int = 50_000, *, idle_s: float = 1800.0) -> None:
        if capacity < 1 or not idle_s > 0:
            raise ValueError(f"capacity and idle_s must be positive, got {capacity} and {idle_s}")
        self.capacity = capacity
        self.idle_s = idle_s
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def _expire(self, now: float) -> None:
        sessions, horizon = self._sessions, now - self.idle_s
        while sessions:
            oldest = next(iter(sessions.values()))
            if oldest.seen > horizon:
                return
            sessions.popitem(last=False)

    def check(self, session: str, policy: AgentLoopPolicy, prompt_tokens: int, hash_ids: Sequence[int], now: float) -> Verdict | None:
        """A step of `session` with a prompt of `prompt_tokens` tokens whose 512-token block
        ids are `hash_ids`: None (serve it, nothing to say) or a `Verdict`.

        A step served is counted; a refused one is not (the session is as it was)."""
        self._expire(now)
        sessions = self._sessions
        entry = sessions.get(session)
        if entry is None:
            entry = sessions[session] = _Session(now)
            if len(sessions) > self.capacity:
                sessions.popitem(last=False)
        else:
            sessions.move_to_end(session)
            entry.seen = now
        common = _common_blocks(entry.prev, entry.stride, hash_ids) if entry.prev else 0
        repeated = min(1.0, common * BLOCK_TOKENS / prompt_tokens) if prompt_tokens else 0.0
        pct = int(repeated * 100)
        limit, action = _over(entry, policy, prompt_tokens, pct)
        summarized = False
        if action == "summarize" and entry.peak and prompt_tokens <= policy.summarize_below * entry.peak:
            fresh = _over(_FRESH, policy, prompt_tokens, pct)  # a summarization: judged as a new session's first step
            if fresh[1] != "reject" and fresh[1] != "summarize":
                entry.restart()  # served, and the budget starts again
                summarized = True
                limit, action = fresh
        sizes = entry.sizes  # the prompts before this one, oldest first
        growth = (prompt_tokens - sizes[0]) / len(sizes) if sizes else 0.0
        if action == "reject" or action == "summarize":
            event = "" if entry.capped else "capped"
            entry.flagged = entry.capped = True
            error = _refusal(session, entry, policy, limit, action, prompt_tokens, growth, repeated)
            return _verdict(limit, action, entry.steps + 1, entry.tokens + prompt_tokens, prompt_tokens, growth, repeated, event, error)
        _count(entry, policy, prompt_tokens, pct, hash_ids)
        if limit:  # warn
            event = "" if entry.flagged else "flagged"
            entry.flagged = True
            return _verdict(limit, "warn", entry.steps, entry.tokens, prompt_tokens, growth, repeated, event)
        if summarized:
            return _verdict("summarized", "summarize", entry.steps, entry.tokens, prompt_tokens, growth, repeated, "")
        return None

    def settle(self, session: str, completion_tokens: int) -> None:
        """The step's completion joins the session's tokens (a forgotten session: nothing)."""
        entry = self._sessions.get(session)
        if entry is not None:
            entry.tokens += completion_tokens

    def snapshot(self, session: str) -> dict[str, int] | None:
        """A session's counts (for tests and status pages)."""
        entry = self._sessions.get(session)
        if entry is None:
            return None
        return {"steps": entry.steps, "tokens": entry.tokens, "peak": entry.peak}


# -- the policy (functions of one session's state)


def _over(entry: _Session, policy: AgentLoopPolicy, n: int, pct: int) -> tuple[str, str]:
    """The limit a step with an `n`-token prompt repeating `pct`% would cross (of several,
    the one with the strongest action) and that action; ("", "") for none."""
    limit, action = "", ""
    if policy.max_prompt_tokens is not None and n > policy.max_prompt_tokens:
        limit, action = "max_prompt_tokens", policy.action
    elif policy.max_steps is not None and entry.steps + 1 > policy.max_steps:
        limit, action = "max_steps", policy.action
    elif policy.max_session_tokens is not None and entry.tokens + n > policy.max_session_tokens:
        limit, action = "max_session_tokens", policy.action
    runaway = policy.runaway
    if runaway is not None and (not action or _STRENGTH[runaway.action or policy.action] > _STRENGTH[action]):
        k, sizes, floor = runaway.window, entry.sizes, runaway.min_repeated * 100
        if len(sizes) >= k and (n - sizes[-k]) / k > runaway.min_growth and pct >= floor and all(s >= floor for s in entry.shares[-(k - 1):]):
            limit, action = "runaway", runaway.action or policy.action
    return limit, action


def _count(entry: _Session, policy: AgentLoopPolicy, n: int, pct: int, hash_ids: Sequence[int]) -> None:
    """A step served: it joins the session's counts and its recent window."""
    entry.steps += 1
    entry.tokens += n
    entry.peak = max(entry.peak, n)
    keep = policy.runaway.window if policy.runaway is not None else 1
    sizes, shares = entry.sizes, entry.shares
    sizes.append(n)
    if len(sizes) > keep:
        del sizes[: len(sizes) - keep]
    shares.append(pct)
    if len(shares) >= keep:
        del shares[: len(shares) - keep + 1]
    entry.prev, entry.stride = _sample(hash_ids)


def _verdict(limit: str, action: str, steps: int, tokens: int, n: int, growth: float, repeated: float, event: str,
             error: PermissionDenied | None = None) -> Verdict:  # fmt: skip
    header = f"{limit}; action={action}; steps={steps}; tokens={tokens}"
    if limit == "runaway":
        header += f"; growth={growth:.0f}; repeated={repeated:.2f}"
    return Verdict(limit, action, steps, tokens, n, growth, repeated, event, header, error)


def _refusal(session: str, entry: _Session, policy: AgentLoopPolicy, limit: str, action: str, n: int, growth: float, repeated: float) -> PermissionDenied:
    """The 403 of a refused step: which policy, which limit, what to do."""
    tenant, _, name = session.partition("/")
    what = f"agent session {name!r} of tenant {tenant!r}"
    if limit == "max_steps":
        why = f"agent_loops.max_steps is {_fmt(policy.max_steps or 0)} and this would be step {_fmt(entry.steps + 1)}"
    elif limit == "max_session_tokens":
        why = (f"agent_loops.max_session_tokens is {_fmt(policy.max_session_tokens or 0)}; the session has used "
               f"{_fmt(entry.tokens)} and this prompt has {_fmt(n)}")  # fmt: skip
    elif limit == "max_prompt_tokens":
        why = f"agent_loops.max_prompt_tokens is {_fmt(policy.max_prompt_tokens or 0)} and this prompt has {_fmt(n)}"
    else:
        runaway = policy.runaway
        assert runaway is not None
        why = (f"agent_loops.runaway: the prompt grew {_fmt(growth)} tokens a step over the last {runaway.window} steps "
               f"(limit {_fmt(runaway.min_growth)}) while re-sending at least {runaway.min_repeated:.0%} of itself each step "
               f"({repeated:.0%} now)")  # fmt: skip
    if action == "reject":
        return PermissionDenied(
            f"The {what} is stopped by the tenant's agent-loop policy: {why}. Start a new session "
            "(another x-session-id or user) from a summary of this one, or ask the operator to raise the limit.",
            code="agent_loop_limit",
        )
    most = int(policy.summarize_below * entry.peak)
    todo = (
        f"summarize the conversation and send a prompt of at most {_fmt(most)} tokens ({policy.summarize_below:.0%} of the "
        f"session's longest, {_fmt(entry.peak)}) to go on; this prompt has {_fmt(n)}"
        if entry.peak and n > most else "this prompt alone is over it: send a shorter one"
    )  # fmt: skip
    return PermissionDenied(f"The {what} is over its agent-loop budget ({why}): {todo}.", code="summarization_required")
