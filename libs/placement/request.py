"""What a placement decision is asked: one request, reduced to what filtering and scoring read.

The caller (router or simulator) builds one `PlacementRequest` per attempt. The things
that do not change per request are built once elsewhere: a tenant's `Boundary` when the
tenant configuration loads, the prompt's block hashes once per request (not per attempt;
`dataclasses.replace(req, exclude=...)` for a retry reuses them).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from tierflow.placement.view import NodeView

__all__ = ["Boundary", "ANYWHERE", "END_OF_PROMPT", "RequestWorkload", "PlacementRequest"]

RequestWorkload = Literal["interactive", "batch"]

# Ends every prefix walk: no node's set of hashes can contain it.
END_OF_PROMPT: Final = object()


@dataclass(frozen=True, slots=True)
class Boundary:
    """Where a tenant's requests may run: a set of regions and a residency tag.

    `regions=None` allows any region; `residency=None` allows any residency. When a
    residency is set, only nodes carrying exactly that tag qualify; an untagged node is
    *outside* (fail closed: a node that does not claim the residency cannot be assumed to
    honour it). A node's residency tag does not keep other tenants away: it states what the
    node guarantees, not who may use it.
    """

    regions: frozenset[str] | None = None
    residency: str | None = None

    @property
    def unbounded(self) -> bool:
        return self.regions is None and self.residency is None

    def allows(self, node: NodeView) -> bool:
        return (self.regions is None or node.region in self.regions) and (
            self.residency is None or node.residency == self.residency
        )

    def describe(self) -> str:
        """For error messages: "region(s) {eu-west} and residency 'eu'"."""
        parts = []
        if self.regions is not None:
            parts.append("region(s) {" + ", ".join(sorted(self.regions)) + "}")
        if self.residency is not None:
            parts.append(f"residency {self.residency!r}")
        return " and ".join(parts) or "anywhere"


ANYWHERE: Final = Boundary()


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """One placement question.

    - `version`: the version the traffic split picked, or None for any version.
    - `prompt_hashes`: `tierflow.rdu.block_hashes(prompt_token_ids, block_size)` with the
      nodes' block size; only its leading run matters for the prefix cache.
    - `affinity_node`: the node this session last used (from `SessionTable.last_node`).
    - `workload`: "interactive" prefers high-interactivity deployments, "batch"
      high-throughput ones; None has no preference.
    - `exclude`: nodes already tried for this request (retries go elsewhere).
    - `prompt_tokens`: the prompt's length, to price its prefill on each node.
    """

    model: str
    version: str | None = None
    prompt_hashes: Sequence[int] = ()
    session_id: str = ""
    affinity_node: str | None = None
    boundary: Boundary = ANYWHERE
    workload: RequestWorkload | None = None
    exclude: frozenset[str] = frozenset()
    prompt_tokens: int = 0  # the prompt's length (0: unknown; its full blocks then stand for it)
    # The prefix walk's input, with a sentinel so the walk never runs off the end.
    probe: tuple[object, ...] = field(init=False, repr=False, compare=False, default=())

    def excluding(self, nodes: Collection[str]) -> PlacementRequest:
        """This request with `exclude` = `nodes`: itself when that is already so (a first
        attempt), else a copy that keeps the prompt's probe (`dataclasses.replace` would
        rebuild it, and re-run the checks, per attempt)."""
        if len(nodes) == len(self.exclude) and all(node in self.exclude for node in nodes):
            return self
        new = object.__new__(PlacementRequest)
        put = object.__setattr__
        for name in PlacementRequest.__slots__:
            put(new, name, getattr(self, name))
        put(new, "exclude", frozenset(nodes))
        return new

    def __post_init__(self) -> None:
        if self.workload not in (None, "interactive", "batch"):
            raise ValueError(f"workload must be None, 'interactive' or 'batch', not {self.workload!r}")
        object.__setattr__(self, "probe", (*self.prompt_hashes, END_OF_PROMPT))
