"""Events the router publishes for whoever watches the fabric (the observer identity may
subscribe): what happened to a tenant's traffic, as it happened. Fire and forget, core
NATS: a watcher that is away misses them (the request records say the same, durably).

    tierflow.events.agent_loop.<tenant>   `AgentLoopEvent`: an agent session flagged or capped
                                          (tierflow.placement.agent_loops)

Same evolution rules as `messages`: new fields get defaults, nothing is retyped, unknown
fields are ignored; every field is bounded on decode.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = ["AgentLoopEvent", "agent_loop_decoder", "encoder"]

_Name = Annotated[str, Meta(max_length=256)]
_Count = Annotated[int, Meta(ge=0)]


class AgentLoopEvent(Struct, kw_only=True):
    """An agent session went over its tenant's agent-loop policy.

    `kind`: "flagged", its first step over a limit, served (action warn); "capped", its
    first step refused (reject, or summarize without a short prompt); a session says each
    at most once (again after a summarization starts its budget afresh). `limit` names
    the policy's limit (max_steps, max_session_tokens, max_prompt_tokens, runaway);
    `steps` and `tokens` are the session's with the step that crossed it."""

    kind: Literal["flagged", "capped"]
    tenant: _Name
    session: Annotated[str, Meta(max_length=512)]  # the router's session key: "<tenant>/<x-session-id or user>"
    limit: _Name
    action: Literal["warn", "reject", "summarize"]
    steps: _Count
    tokens: _Count
    prompt_tokens: _Count
    growth: float  # prompt tokens per step over the recent window
    repeated: Annotated[float, Meta(ge=0.0, le=1.0)]  # share of the prompt equal to the step before
    model: _Name = ""
    request_id: _Name = ""
    router_id: _Name = ""
    at: float = 0.0  # wall clock, for people


encoder = msgspec.json.Encoder()
agent_loop_decoder = msgspec.json.Decoder(AgentLoopEvent)
