"""One model call on its way through the simulated fabric: the request and what befell it.

A `Call` is created when a session's step sends it and carries everything the router,
the nodes and the client learn about it until it ends in a `RequestRecord`. Plain
`__slots__` class, not a Struct: it is mutated at every hop and never serialised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tierflow.placement import ModelRoute, PlacementRequest, Tenant
from tierflow.workload.sessions import CallPlan

if TYPE_CHECKING:
    from tierflow.sim.client import SessionRun

__all__ = ["Call"]


class Call:
    """A model call in flight. Times are virtual seconds since the run's start.

    Router side: `tenant`, `route`, `placement`, the nodes `tried`, how many of those
    answered queue_full (`overloaded`), the `attempt` count and the `last_failure`.
    Node side: the decode `node`, the `tier` the model was found in and the prompt tokens
    served from a prefix cache (`cached_tokens`).
    """

    __slots__ = (
        "request_id", "run", "step", "model", "prompt", "prompt_tokens", "max_tokens", "sent_at",
        "tenant", "route", "placement", "tried", "overloaded", "attempt", "last_failure",
        "node", "tier", "cached_tokens",
    )  # fmt: skip

    def __init__(self, request_id: str, run: SessionRun, step: CallPlan, prompt: list[int], sent_at: float) -> None:
        self.request_id = request_id
        self.run = run
        self.step = step
        self.model = step.model
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.max_tokens = step.max_tokens
        self.sent_at = sent_at
        self.tenant: Tenant | None = None
        self.route: ModelRoute | None = None
        self.placement: PlacementRequest | None = None
        self.tried: set[str] = set()
        self.overloaded = 0
        self.attempt = 0
        self.last_failure = ""
        self.node = ""
        self.tier = ""
        self.cached_tokens = 0
