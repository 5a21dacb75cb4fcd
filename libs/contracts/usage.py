"""The usage ledger's record: one finished request's tokens, as its tenant is charged for them.

One `UsageRecord` per message on `subjects.usage(tenant, router)`, kept in the JetStream
stream `subjects.USAGE_STREAM` (made by every router at start; retention by age, the
router's `usage_max_age`). Each is published with the `Nats-Msg-Id` header set to the
request id, so a publish retried after a lost acknowledgement is stored once (within the
stream's duplicate window; readers drop repeats of a request id beyond it too).

Which requests have a record: every request its tenant *admitted* (it took a rate-limit
token and a quota reservation), whatever its outcome:

    ok         it finished: the tokens of its response's `usage`
    error      it failed after admission (a node failure past the retries, a deadline, an
               overload refusal): the tokens the client received, if any
    cancelled  the client went away: the tokens it had received

Refusals before admission (401, 404, 400, the tenant's own 429) cost nothing and have none.
A failed or cancelled request is charged what the client got: its prompt once any output
came, plus the completion tokens sent; nothing when no token came out. So the tokens here
are exactly what the tenant's quota was charged (`prompt_tokens + completion_tokens`), and
the records of failures count as admitted requests when a restarted router rebuilds its
rate buckets. A request in flight when its router is killed has no record (it was never
answered either); one whose record was still in the router's buffer at a SIGKILL is lost
(the buffer is flushed at once, and whole on a graceful stop).

Times are seconds since the epoch by the router's clock: `admitted_at` is when the request
took its reservation (the quota window it counts in), `at` when it ended.

Same evolution rules as `messages`: new fields get defaults, nothing is retyped.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec
from msgspec import Struct

__all__ = ["Outcome", "OUTCOMES", "UsageRecord", "usage_decoder", "batch_decoder", "encoder", "total_tokens"]

Outcome = Literal["ok", "error", "cancelled"]
OUTCOMES: Final[tuple[str, ...]] = ("ok", "error", "cancelled")


class UsageRecord(Struct, kw_only=True, gc=False):
    v: int = 1
    request_id: str
    tenant: str
    model: str
    version: str = ""
    request_class: str = "standard"
    api: str = ""  # chat | completions | grpc | embeddings | rerank
    prompt_tokens: int = 0  # charged prompt tokens (0 when no output came)
    cached_tokens: int = 0  # of those, served from a prefix cache (the response's cached_tokens)
    completion_tokens: int = 0
    energy_j: float | None = None  # the nodes' joules, when they reported them (a finished request)
    outcome: Outcome
    status: int  # the HTTP status the client got (499: it went away)
    error: str = ""  # the error code, for outcome "error"
    finish_reason: str = ""
    router: str  # the router that admitted it (its NATS identity's id when it has one)
    admitted_at: float
    at: float


def total_tokens(rec: UsageRecord) -> int:
    """What the record charged its tenant's quota."""
    return rec.prompt_tokens + rec.completion_tokens


usage_decoder: Final = msgspec.json.Decoder(UsageRecord)
batch_decoder: Final = msgspec.json.Decoder(list[UsageRecord] | UsageRecord)
"""A ledger message: a JSON array of one tenant's records (a router's batch), or one record."""
encoder: Final = msgspec.json.Encoder()
