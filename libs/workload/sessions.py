"""Session plans: what every session of a run will do and when it starts, drawn once from a seed.

The live driver and the simulator both run these plans, so a difference between their
reports is the fabric's doing, never the workload's. All text is made of words that
are each exactly one token of `tierflow.tokenizer` (`OUTPUT_VOCAB`: a leading space and
letters), so every size in the spec is an exact token count:

- a role's system prompt is `system_tokens` tokens and the same text in every session
  (drawn from the role's name, not the seed), so the sessions of a role share a cached
  prompt prefix on the fabric, as agents built on one template do;
- a session's task is `task_tokens` tokens and unique to the session: it opens with the
  session's index spelled in words (least significant first, through a permutation of
  the vocabulary drawn from the seed), so two sessions never share more than the system
  prompt, and two seeds give different tasks. Re-running a spec with the same seed on a
  warm fabric finds its task prompts already cached;
- a tool step's output is `output_tokens` random words of the session.

Each session draws from its own stream of the seed, so adding arrivals at the end of a
run never changes the sessions before them.
"""

from __future__ import annotations

import functools
import sys
import zlib

import msgspec
import numpy as np

from tierflow.tokenizer import OUTPUT_VOCAB
from tierflow.workload.arrivals import arrival_times
from tierflow.workload.spec import CallStep, Distribution, FlowSpec, MixSpec, TenantSpec, WorkloadSpec
from tierflow.workload.trace_text import TracePrompt

__all__ = ["CallPlan", "ToolPlan", "SessionPlan", "plan_sessions", "system_text", "draw_tokens"]

_VOCAB = np.array(OUTPUT_VOCAB)
_CHOICE_STREAM = 0x43484F53  # which flow and tenant each arrival gets ("CHOS")
_LABEL_STREAM = 0x4C41424C  # the permutation that spells session indices ("LABL")
_SESSION_STREAM = 0x53455353  # one stream per session ("SESS")
_SYSTEM_STREAM = 0x53595354  # system prompts, per role ("SYST")


class CallPlan(msgspec.Struct, frozen=True, tag="call"):
    """One model call: `system_text` (empty: no system message) then the conversation so far."""

    index: int
    model: str
    role: str
    system_text: str
    max_tokens: int


class ToolPlan(msgspec.Struct, frozen=True, tag="tool"):
    """One tool step: takes `latency_s`, then `output_text` joins the history as a user message."""

    index: int
    tool: str
    latency_s: float
    output_text: str


class SessionPlan(msgspec.Struct, frozen=True):
    """One session: starts at `start` (seconds since the run's start), runs `steps` in order.

    A trace replay (`tierflow.workload.replay`) makes one plan per trace row. Its task is
    `task_prompt`, synthesized when the plan runs (`Conversation.for_plan`), since a
    replay's prompts would not fit in memory as text; its `task_text` is then empty.
    `user` is the session the router keeps together (sent as OpenAI's `user`, and the
    records' session): a trace's session column, or "" for the plan's own `session_id`.
    """

    session_id: str
    tenant: str
    api_key: str
    workload: str | None
    flow: str
    start: float
    task_text: str
    steps: tuple[CallPlan | ToolPlan, ...]
    think_s: float
    user: str = ""
    task_prompt: TracePrompt | None = None
    request_class: str | None = None  # the tenant's `request_class` (sent as service_tier); None: its default

    @property
    def calls(self) -> tuple[CallPlan, ...]:
        return tuple(step for step in self.steps if isinstance(step, CallPlan))

    @property
    def session_key(self) -> str:
        """The session the fabric sees (`user`) and reports count: `user`, else `session_id`."""
        return self.user or self.session_id


def _words(rng: np.random.Generator, n: int) -> str:
    return "".join(_VOCAB[rng.integers(0, _VOCAB.size, n)]) if n > 0 else ""


@functools.lru_cache(maxsize=1024)
def system_text(role: str, tokens: int) -> str:
    """The system prompt of `role`: `tokens` one-token words, the same in every session and run."""
    return _words(np.random.default_rng([zlib.crc32(role.encode()), _SYSTEM_STREAM]), tokens)


def draw_tokens(size: int | Distribution, rng: np.random.Generator) -> int:
    """A token count: fixed, or normal around `mean` (rounded) and clipped to [min, max]."""
    if isinstance(size, int):
        return size
    value = round(float(rng.normal(size.mean, size.sd))) if size.sd > 0 else round(size.mean)
    return int(min(max(value, size.min), size.max if size.max is not None else sys.maxsize))


def _task_text(index: int, tokens: int, label: np.ndarray, rng: np.random.Generator) -> str:
    digits = [index % _VOCAB.size]
    rest = index // _VOCAB.size
    while rest:
        digits.append(rest % _VOCAB.size)
        rest //= _VOCAB.size
    head = digits[:tokens]
    return "".join(_VOCAB[label[head]]) + _words(rng, tokens - len(head))


def _pick(cumulative: np.ndarray, u: float) -> int:
    """The index that `u` in [0, 1) falls on, by the weights whose running sum is `cumulative`."""
    return min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), cumulative.size - 1)


def _flow_steps(flow: FlowSpec, rng: np.random.Generator) -> tuple[CallPlan | ToolPlan, ...]:
    steps: list[CallPlan | ToolPlan] = []
    for index, step in enumerate(flow.steps):
        if isinstance(step, CallStep):
            role = step.role or step.model
            steps.append(CallPlan(index, step.model, role, system_text(role, step.system_tokens), draw_tokens(step.max_tokens, rng)))
        else:
            steps.append(ToolPlan(index, step.tool, step.latency_s, _words(rng, step.output_tokens)))
    return tuple(steps)


def plan_sessions(spec: WorkloadSpec, *, seed: int | None = None, duration_s: float | None = None, rate_scale: float = 1.0) -> list[SessionPlan]:
    """Every session of a run, sorted by start; the same list for the same arguments.

    `seed` defaults to the spec's, `duration_s` (when given) replaces the spec's cap, and
    `rate_scale` multiplies every arrival rate. Each arrival is a flow session or (with
    flow "mix") one call of the spec's model mix, chosen by weight; its tenant is chosen by
    weight among the tenants allowed to run that flow.
    """
    if spec.trace is not None:
        raise ValueError(f"spec {spec.name!r} replays a trace: plan it with tierflow.workload.replay.plan_replay")
    seed = spec.seed if seed is None else seed
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    times = arrival_times(spec.arrivals, seed=seed, rate_scale=rate_scale, duration_s=duration_s if duration_s is not None else spec.duration_s)
    choices: list[FlowSpec | MixSpec] = [*spec.flows, *([spec.mix] if spec.mix is not None else [])]
    by_name = {t.name: t for t in spec.tenants}
    eligible: list[list[TenantSpec]] = [
        [by_name[n] for n in c.tenants] if isinstance(c, FlowSpec) and c.tenants is not None else list(spec.tenants) for c in choices
    ]
    choice_weights = np.cumsum([c.weight for c in choices])
    tenant_weights = [np.cumsum([t.weight for t in tenants]) for tenants in eligible]
    picks = np.random.default_rng([seed, _CHOICE_STREAM]).random((times.size, 2))
    label = np.random.default_rng([seed, _LABEL_STREAM]).permutation(_VOCAB.size)
    plans: list[SessionPlan] = []
    for index, start in enumerate(times.tolist()):  # arrival_times is sorted, so plans are too
        which = _pick(choice_weights, float(picks[index, 0]))
        choice = choices[which]
        tenant = eligible[which][_pick(tenant_weights[which], float(picks[index, 1]))]
        rng = np.random.default_rng([seed, _SESSION_STREAM, index])
        if isinstance(choice, FlowSpec):
            task = _task_text(index, draw_tokens(choice.task_tokens, rng), label, rng)
            steps = _flow_steps(choice, rng)
            flow, think_s = choice.name, choice.think_s
        else:
            model = choice.models[_pick(np.cumsum([m.weight for m in choice.models]), float(rng.random()))].model
            task = _task_text(index, draw_tokens(choice.prompt_tokens, rng), label, rng)
            steps = (CallPlan(0, model, "", "", draw_tokens(choice.max_tokens, rng)),)
            flow, think_s = "mix", 0.0
        plans.append(SessionPlan(f"s{index:06d}", tenant.name, tenant.api_key, tenant.workload, flow, start, task, steps, think_s,
                                 request_class=tenant.request_class))  # fmt: skip
    return plans
