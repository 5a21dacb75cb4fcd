"""Which nodes may take a request at all, and, when none may, why not.

The rules live here, in `eligible`, which every policy calls; the hotness scorer applies
the same rules to its columns (`HotnessAware._score`, a mask per rule), and a property
test holds the two to the same answers, so policies never disagree about residency or
health:

- the node serves the model (at the requested version, when one is requested);
- it is live (heard from within `MISSED_BEATS` of its heartbeat intervals), not
  cordoned, not draining, and not suspect;
- it is inside the tenant's `Boundary` (region and residency). This fails closed:
  when nothing inside the boundary can serve, the answer is `NoEligibleNode`, never a
  node outside it;
- it has not already been tried for this request.

`diagnose` is the slow path, run only when `eligible` comes back empty: it names the
first rule that emptied the candidate set, in words a 503 can carry to the client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal

from tierflow.placement.request import PlacementRequest
from tierflow.placement.view import ModelSlot, NodeView

__all__ = ["Candidate", "NoEligibleNode", "IneligibleCode", "eligible", "diagnose"]

Candidate = tuple[NodeView, ModelSlot]
IneligibleCode = Literal["model_not_served", "version_not_served", "outside_boundary", "unavailable", "all_tried"]

# The order in which a node's unavailability is reported (first that applies).
_CAUSES: Final = ("silent", "cordoned", "draining", "suspect", "already tried")


class NoEligibleNode(Exception):
    """No node may take the request. The router answers 503 with `reason`.

    `code` is stable for metrics and clients; `counts` (for "unavailable" and
    "all_tried") says how many in-boundary nodes were out for which cause.
    """

    def __init__(
        self,
        reason: str,
        *,
        code: IneligibleCode,
        model: str,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code: IneligibleCode = code
        self.model = model
        self.counts: Mapping[str, int] = dict(counts or {})


def eligible(nodes: Iterable[NodeView], request: PlacementRequest, now: float) -> list[Candidate]:
    """The (node, model slot) pairs that may take `request` at `now`, in input order."""
    model, version = request.model, request.version
    regions, residency = request.boundary.regions, request.boundary.residency
    exclude = request.exclude
    key = (model, version)
    out: list[Candidate] = []
    for node in nodes:
        if node.blocked or now > node.stale_after or node.suspect_until > now:
            continue
        if regions is not None and node.region not in regions:
            continue
        if residency is not None and node.residency != residency:
            continue
        slot = node.slots.get(model) if version is None else node.versions.get(key)
        if slot is None or (exclude and node.node_id in exclude):
            continue
        out.append((node, slot))
    return out


def _cause(node: NodeView, now: float) -> str:
    if now > node.stale_after:
        return "silent"
    if node.cordoned:
        return "cordoned"
    if node.draining:
        return "draining"
    if node.suspect_until > now:
        return "suspect"
    return "already tried"


def diagnose(nodes: Iterable[NodeView], request: PlacementRequest, now: float) -> NoEligibleNode:
    """Why `eligible(nodes, request, now)` is empty, as an exception to raise.

    Checked in order: is the model served at all, at this version, inside the boundary,
    and then what keeps the in-boundary nodes out (silent, cordoned, draining, suspect,
    already tried). The message names the tenant's boundary whenever it has one.
    """
    model, version, boundary = request.model, request.version, request.boundary
    serving = [n for n in nodes if model in n.slots]
    if not serving:
        return NoEligibleNode(f"no node serves model {model!r}", code="model_not_served", model=model)
    if version is not None:
        at_version = [n for n in serving if (model, version) in n.versions]
        if not at_version:
            seen = sorted({v for n in serving for (m, v) in n.versions if m == model and v})
            have = f" (nodes serve {', '.join(seen)})" if seen else ""
            return NoEligibleNode(
                f"no node serves model {model!r} at version {version!r}{have}", code="version_not_served", model=model
            )
        serving = at_version
    inside = [n for n in serving if boundary.allows(n)]
    if not inside:
        return NoEligibleNode(
            f"all {len(serving)} node(s) serving model {model!r} are outside the tenant's boundary "
            f"({boundary.describe()}); requests are never placed outside it",
            code="outside_boundary",
            model=model,
        )
    counts = dict.fromkeys(_CAUSES, 0)
    for node in inside:
        counts[_cause(node, now)] += 1
    counts = {k: v for k, v in counts.items() if v}
    where = "" if boundary.unbounded else f" inside {boundary.describe()}"
    detail = ", ".join(f"{v} {k}" for k, v in counts.items())
    code: IneligibleCode = "all_tried" if set(counts) == {"already tried"} else "unavailable"
    return NoEligibleNode(
        f"no node serving model {model!r}{where} can take work now ({detail}); retry shortly",
        code=code,
        model=model,
        counts=counts,
    )
