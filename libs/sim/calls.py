"""One model call on its way through the simulated fabric: the request and what befell it.

A `Call` is created when a session's step sends it and carries everything the router,
the nodes and the client learn about it until it ends in a `RequestRecord`. Plain
`__slots__` class, not a Struct: it is mutated at every hop and never serialised.

A call carries its prompt as what the fabric reads of it: its length and its block
hashes (the router's placement and the engine's prefix cache), both computed once when
it is sent. Its token ids exist only when the engines run with per-token events, the one
mode in which they read them (see `PromptLength`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from tierflow.placement import ModelRoute, PlacementRequest, Tenant
from tierflow.placement.admission import Ticket
from tierflow.placement.tenants import Reservation
from tierflow.workload.sessions import CallPlan

if TYPE_CHECKING:
    from tierflow.sim.client import SessionRun

__all__ = ["Call", "PromptLength"]


class PromptLength(Sequence[int]):
    """A prompt the engine may measure but not read: `len()` is its token count, reading
    an id raises.

    `NodeEngine.submit` reads a prompt's ids for two things only: hashing its blocks,
    which it skips when the caller brings `prompt_block_hashes`, and drawing the
    completion, which it skips unless per-token events are on or EOS counts. A simulated
    call always brings its hashes and ignores EOS, so without token events the engine
    needs only the length, and a replay's 8k-token prompts need never be built. Reading
    an id raises (RuntimeError, which `pack_tokens` does not turn into a rejection), so an
    engine that starts reading them fails loudly instead of running on made-up tokens.
    """

    __slots__ = ("_tokens",)

    def __init__(self, tokens: int) -> None:
        self._tokens = tokens

    def __len__(self) -> int:
        return self._tokens

    def __getitem__(self, index: int | slice) -> NoReturn:
        raise _unbuilt()

    def __iter__(self) -> Iterator[int]:
        raise _unbuilt()


def _unbuilt() -> RuntimeError:
    return RuntimeError("this prompt's token ids were not built: the simulator builds them only with token_events")


class Call:
    """A model call in flight. Times are virtual seconds since the run's start.

    The prompt: `prompt_tokens`, `prompt_hashes` (`tierflow.rdu.block_hashes` of its ids
    at the router's block size) and `prompt_ids`, the ids themselves only when the
    engines read them (None otherwise: see `engine_prompt`).
    Router side: `tenant`, `request_class`, `route`, `placement`, the nodes `tried`, how many of those
    answered queue_full (`overloaded`), the `attempt` count and the `last_failure`, and
    its admission `ticket` (with the node's `queue_time`, fed back to admission).
    Node side: the decode `node`, the `tier` the model was found in and the prompt tokens
    served from a prefix cache (`cached_tokens`), and the energy its finished legs drew (`energy_j`).
    """

    __slots__ = (
        "request_id", "run", "step", "model", "prompt_tokens", "prompt_hashes", "prompt_ids", "max_tokens", "sent_at",
        "tenant", "route", "placement", "tried", "overloaded", "attempt", "last_failure",
        "node", "tier", "cached_tokens", "energy_j", "booked", "started", "ticket", "reservation", "queue_time", "request_class",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        run: SessionRun,
        step: CallPlan,
        sent_at: float,
        *,
        prompt_tokens: int,
        prompt_hashes: list[int],
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.request_id = request_id
        self.run = run
        self.step = step
        self.model = step.model
        self.prompt_tokens = prompt_tokens
        self.prompt_hashes = prompt_hashes
        self.prompt_ids = prompt_ids
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
        self.energy_j = 0.0  # the Finished energy of its legs so far (prefill, then decode)
        self.booked = 0  # prompt tokens the router booked on `node` as queued for prefill (NodeTable.note_dispatch); -1 once ended
        self.started = False  # the router moved it into `node`'s batch (NodeTable.note_started); True once ended
        self.ticket: Ticket | None = None  # its hold on the model's admission limit (SimRouter.admit), released once it ends
        self.reservation: Reservation | None = None  # its tokens held against the tenant's quota, settled once it ends
        self.queue_time = 0.0  # how long its decode node queued it (`RequestStarted.queue_time`), for admission
        # Its class where queues form (tierflow.placement.classes), as the router resolved it
        # (`Tenant.request_class`); the node's engine queues it by class, then by `tenant`.
        self.request_class = "standard"

    def engine_prompt(self) -> Sequence[int]:
        """The prompt for `EngineRequest.prompt_token_ids`: its ids when they were built,
        else a `PromptLength` (enough for an engine without token events, see there)."""
        return self.prompt_ids if self.prompt_ids is not None else PromptLength(self.prompt_tokens)
