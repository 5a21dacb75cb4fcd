"""What one request did, as seen by its client: the common output of live runs and simulations.

Times are seconds since the start of the run (the live driver's monotonic clock, or the
simulator's virtual clock), so a report never depends on which produced its records.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["RequestRecord", "Outcome"]

Outcome = Literal["ok", "error", "rejected"]  # rejected: 429/503 (back-pressure, boundary); error: anything else


class RequestRecord(msgspec.Struct, kw_only=True, gc=False):
    """One model call.

    - `sent_at`, `first_token_at`, `finished_at`: seconds since the run's start; the two
      later ones are None when the request failed before them.
    - `tier`: where the node found the model ("hbm", "ddr", "cold"; "" when unknown).
    - `cached_tokens`: prompt tokens served from the prefix cache.
    - `node`: the node that served it ("" when unknown).
    - `status`: the HTTP status (200 on success; the simulator uses the status the router
      would have answered with) and `error` a short type such as "rate_limited".
    """

    request_id: str
    session_id: str
    tenant: str
    flow: str
    step: int
    model: str
    sent_at: float
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tier: str = ""
    node: str = ""
    outcome: Outcome = "ok"
    status: int = 200
    error: str = ""
    energy_j: float = 0.0  # the request's share of its nodes' energy (tierflow.rdu.energy); 0: unknown

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def e2e(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.sent_at

    @property
    def itl(self) -> float | None:
        """Mean inter-token latency of this request (vLLM's TPOT): decode time per token after the first."""
        if self.finished_at is None or self.first_token_at is None or self.completion_tokens < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.completion_tokens - 1)
