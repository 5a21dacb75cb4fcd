"""The autoscaler's durable records (JetStream KV bucket `subjects.AUTOSCALER_BUCKET`) and
the names of cordon owners.

    lease            `Lease`: which autoscaler instance may act, renewed every tick
    removal.<node>   `Removal`: a scale-down under way (cordon -> drain -> stop), written
                     before the node is touched, deleted once it is stopped or taken back

Why KV and not memory: an autoscaler that dies mid-drain leaves a cordoned node behind;
its successor reads these records to finish or undo what it began, and tells the
autoscaler's own cordons from an operator's by the node's `cordon_owner`.

Times in these records are wall-clock seconds for people (`tierflow` tools, logs); no
decision reads them, since two machines' clocks need not agree: a lease's expiry is
judged by each reader on its own monotonic clock (services/autoscaler/lease.py).
Same evolution rules as `messages`: new fields get defaults, nothing is retyped.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "AUTOSCALER_OWNER",
    "OPERATOR_OWNER",
    "Lease",
    "Removal",
    "RemovalPhase",
    "lease_decoder",
    "removal_decoder",
]

# Who cordoned a node (`NodeCommand.owner`, `NodeHeartbeat.cordon_owner`). A node keeps a
# cordon's owner until it is uncordoned; another controller cannot take it over, an
# operator can (tierflow.nodehost.control).
AUTOSCALER_OWNER: Final = "autoscaler"
OPERATOR_OWNER: Final = "operator"

RemovalPhase = Literal["draining", "stopping"]


class Lease(Struct, kw_only=True):
    """The one active autoscaler. `holder` empty: released (a standby may take it at once).

    `term` grows by one at every change of holder; removal records carry the term that
    wrote them, so a deposed instance's late writes are recognisable (and refused by
    compare-and-set on the record's revision)."""

    holder: str
    term: Annotated[int, Meta(ge=0)]
    ttl_s: Annotated[float, Meta(gt=0)]  # not renewed for this long (on a reader's clock): expired
    renewed_at: float = 0.0  # wall clock, for people
    expires_at: float = 0.0  # wall clock, for people


class Removal(Struct, kw_only=True):
    """One node being given back. Phases: `draining` (cordoned, waiting for in-flight work
    to finish: may still be taken back) and `stopping` (the actuator was or is being asked
    to stop it: too late to take back)."""

    deployment: str
    pool: Literal["decode", "prefill"]
    node_id: str
    phase: RemovalPhase
    began_at: float  # wall clock, for people
    holder: str  # the autoscaler instance that wrote this version
    term: Annotated[int, Meta(ge=0)]


lease_decoder = msgspec.json.Decoder(Lease)
removal_decoder = msgspec.json.Decoder(Removal)
