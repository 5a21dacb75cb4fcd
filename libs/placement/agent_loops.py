"""Agent-loop policing: a session whose prompts grow without bound is noticed and capped.

(Placeholder for the policy type the tenants configuration reads; the tracker lands with issue 21's agent-loop work.)
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = ["AgentLoopPolicy"]


class AgentLoopPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One tenant's limits on an agent session (a session: the `x-session-id` header or `user`)."""

    max_steps: Annotated[int, Meta(gt=0)] | None = None
    max_session_tokens: Annotated[int, Meta(gt=0)] | None = None
    action: Literal["warn", "reject", "summarize"] = "reject"
