"""The audit stream's record: who did what to which part of the fabric, and whether it held.

One `AuditRecord` per message on `subjects.audit(kind, speaker)`, kept in the JetStream stream
`subjects.AUDIT_STREAM` for as long as its retention says. Kinds and who publishes them:

    registry  the model registry: every admin call that writes (Apply, Rollout, ...),
              refused ones included (no credential, invalid, conflict)
    node      a node: a cordon / uncordon / drain it carried out or refused
    scaling   the autoscaler: a scale-up or scale-down it acted on (nodes started,
              cordoned, drained, stopped)

`identity` is who asked, as the publisher established it: `token:admin` or `cert:<CN>`
at the registry (authenticated), the command's `by` at a node (claimed by a caller whose
NATS identity may publish node control), `autoscaler:<instance>` for scaling.
`anonymous` is a call that carried no credential (then `ok` is false).

Same evolution rules as `messages`: new fields get defaults, nothing is retyped.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

__all__ = ["AuditKind", "AuditRecord", "KINDS", "ANONYMOUS", "audit_decoder", "encoder"]

AuditKind = Literal["registry", "node", "scaling"]
KINDS: Final[tuple[str, ...]] = ("registry", "node", "scaling")
ANONYMOUS: Final = "anonymous"


class AuditRecord(Struct, kw_only=True):
    v: int = 1
    at: float  # seconds since the epoch, by the publisher's clock
    kind: AuditKind
    identity: str  # who asked (see the module docstring)
    action: str  # e.g. "Apply", "SetTraffic", "drain", "scale_down"
    target: str = ""  # what it acted on: a model, a fleet file, a node, a deployment
    ok: bool = True
    detail: dict[str, Any] = {}  # what else a reader needs: the outcome, the peer, the error
    source: str = ""  # the process that published it (service and instance)


audit_decoder: Final = msgspec.json.Decoder(AuditRecord)
encoder: Final = msgspec.json.Encoder()
