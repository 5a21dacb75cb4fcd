"""What placement knows of a node: its last heartbeat, reduced to what filtering and scoring read.

A `NodeView` is immutable, so a heartbeat arriving mid-decision cannot change the
decision under it; the router (and the fleet simulator) replace a node's view wholesale
on each heartbeat. Everything a decision reads more than once per node is derived here,
once per heartbeat, rather than once per request: at 1,000 nodes the per-request loop is
the hot path and the heartbeat is not.

`FleetIndex` groups views by model so a decision walks only the nodes that serve the
requested model (O(candidates), not O(fleet)).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from tierflow.contracts import messages

__all__ = [
    "MISSED_BEATS",
    "TIER_RANK",
    "DeploymentWorkload",
    "ModelSlot",
    "NodeView",
    "FleetIndex",
]

MISSED_BEATS: Final = 3.0
"""A node silent for this many of its own heartbeat intervals is out of rotation."""

DeploymentWorkload = Literal["bundle", "high-interactivity", "high-throughput"]

TIER_RANK: Final[Mapping[str, int]] = {"sram": 0, "hbm": 0, "ddr": 1, "loading": 2, "cold": 3}
"""Hotter is lower. "sram" counts as "hbm": both run without moving weights. Ordered as the
issue orders them: a `loading` model may still be streaming from storage, so it ranks
below one already sitting in DDR."""


@dataclass(frozen=True, slots=True)
class ModelSlot:
    """One model (at one version) on a node: where its weights are and how busy it is."""

    name: str
    version: str = ""  # "" = unknown: serves only requests that accept any version
    tier: str = "ddr"  # "sram" | "hbm" | "ddr" | "loading" | "cold"
    in_flight: int = 0
    queued: int = 0
    max_batch: int = 0  # this model's batch limit on the node (0 = unknown)
    # This model's cached prompt blocks, when the node reports them per model: the
    # router's prefix index's live set when it knows the node (`NodeTable.prefix_sets`),
    # else the heartbeat's recent ones; None falls back to the node's set (over all
    # models: a prompt cached for one model then looks cached for another, since block
    # hashes do not depend on the model). Read only with `in`.
    prefix_hashes: Container[int] | None = None


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node as placement sees it.

    `slots` (model name -> `ModelSlot`) is the source of truth for what the node serves.
    `models` and `tiers` are the older, coarser view the router still constructs; when
    `slots` is empty they are turned into slots (version unknown), otherwise they are
    rederived from `slots`, so `dataclasses.replace` keeps the two consistent.
    """

    node_id: str
    models: frozenset[str] = frozenset()
    tiers: Mapping[str, str] = field(default_factory=dict)  # model -> tier (compatibility view)
    region: str = "local"
    residency: str = ""
    queue_depth: int = 0
    running: int = 0
    max_batch: int = 0
    last_seen: float = 0.0
    interval_s: float = 1.0
    cordoned: bool = False
    draining: bool = False
    suspect_until: float = 0.0  # the router saw it fail a request; avoid it until then
    slots: Mapping[str, ModelSlot] = field(default_factory=dict)
    versions: Mapping[tuple[str, str], ModelSlot] = field(default_factory=dict)  # (name, version) -> slot
    kv_usage: float = 0.0
    deployment: str = ""
    workload: str = "bundle"  # DeploymentWorkload
    prefix_hashes: frozenset[int] = frozenset()
    # Prompt tokens of requests the node holds but has not started prefilling: work every
    # new request's first token waits behind (a node prefills one pass at a time), and
    # what a batch-slot count cannot show (one 85k-token prompt is seconds of it).
    queued_prompt_tokens: int = 0
    # Derived once per view (see the module docstring); not constructor arguments.
    stale_after: float = field(init=False, repr=False, compare=False, default=0.0)
    blocked: bool = field(init=False, repr=False, compare=False, default=False)
    occupancy: float = field(init=False, repr=False, compare=False, default=0.0)  # running / max_batch, 0..1
    backlog: float = field(init=False, repr=False, compare=False, default=0.0)  # queue_depth / max_batch

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.slots:
            put(self, "models", frozenset(self.slots))
            put(self, "tiers", {name: s.tier for name, s in self.slots.items()})
            if not self.versions:
                put(self, "versions", {(s.name, s.version): s for s in self.slots.values()})
        elif self.models:
            slots = {m: ModelSlot(name=m, tier=self.tiers.get(m, "ddr")) for m in self.models}
            put(self, "slots", slots)
            put(self, "versions", {(m, ""): s for m, s in slots.items()})
        put(self, "stale_after", self.last_seen + MISSED_BEATS * self.interval_s)
        put(self, "blocked", self.cordoned or self.draining)
        batch = max(1, self.max_batch)
        put(self, "occupancy", min(1.0, self.running / batch))
        put(self, "backlog", self.queue_depth / batch)

    def _copy(self) -> NodeView:
        """A field-for-field copy that skips the constructor: `dataclasses.replace` re-runs
        it, ~10 us per request on the router's path. Callers set what they change and
        rederive only what that touches."""
        new = object.__new__(NodeView)
        put = object.__setattr__
        for name in _VIEW_FIELDS:
            put(new, name, getattr(self, name))
        return new

    def remap_slots(
        self, change: Callable[[ModelSlot], ModelSlot | None]
    ) -> tuple[dict[str, ModelSlot], dict[tuple[str, str], ModelSlot]]:
        """`slots` and `versions` with `change` applied to each slot (None: keep it as is).
        The two maps share slot objects; a shared slot is changed once, so they still do."""
        made: dict[int, ModelSlot] = {}

        def once(slot: ModelSlot) -> ModelSlot:
            new = made.get(id(slot))
            if new is None:
                new = made[id(slot)] = change(slot) or slot
            return new

        return {name: once(s) for name, s in self.slots.items()}, {key: once(s) for key, s in self.versions.items()}

    def dispatched(
        self, slots: Mapping[str, ModelSlot] | None = None, versions: Mapping[tuple[str, str], ModelSlot] | None = None,
        *, prompt_tokens: int = 0,
    ) -> NodeView:
        """`dataclasses.replace(self, queue_depth=+1, queued_prompt_tokens=+prompt_tokens,
        slots=..., versions=...)` for `NodeTable.note_dispatch`, rederiving only what those
        change (`tiers`, `backlog`). `slots` keeps the same model names; `prompt_tokens` is
        what the dispatched request will prefill there."""
        new = self._copy()
        put = object.__setattr__
        queue_depth = self.queue_depth + 1
        put(new, "queue_depth", queue_depth)
        put(new, "queued_prompt_tokens", self.queued_prompt_tokens + prompt_tokens)
        put(new, "backlog", queue_depth / max(1, self.max_batch))
        if slots is not None:
            put(new, "slots", slots)
            put(new, "tiers", {name: s.tier for name, s in slots.items()})
            if versions:
                put(new, "versions", versions)
            else:
                put(new, "versions", {(s.name, s.version): s for s in slots.values()})
        return new

    def adjusted(self, model: str, *, queued: int = 0, in_flight: int = 0, prompt_tokens: int = 0) -> NodeView:
        """This view with `model`'s requests moved (a request started: queued -1, in_flight
        +1; finished: in_flight -1) and `prompt_tokens` taken off the prefill queue, as the
        router sees them happen between heartbeats; counts never go below 0."""
        new = self._copy()
        put = object.__setattr__
        queue_depth = max(0, self.queue_depth + queued)
        running = max(0, self.running + in_flight)
        put(new, "queue_depth", queue_depth)
        put(new, "running", running)
        put(new, "queued_prompt_tokens", max(0, self.queued_prompt_tokens - prompt_tokens))
        batch = max(1, self.max_batch)
        put(new, "occupancy", min(1.0, running / batch))
        put(new, "backlog", queue_depth / batch)
        if (queued or in_flight) and model in self.slots:

            def moved(s: ModelSlot) -> ModelSlot | None:
                if s.name != model:
                    return None
                return ModelSlot(
                    name=s.name, version=s.version, tier=s.tier, in_flight=max(0, s.in_flight + in_flight),
                    queued=max(0, s.queued + queued), max_batch=s.max_batch, prefix_hashes=s.prefix_hashes,
                )

            slots, versions = self.remap_slots(moved)
            put(new, "slots", slots)
            put(new, "versions", versions)
        return new

    @classmethod
    def from_heartbeat(
        cls,
        hb: messages.NodeHeartbeat,
        now: float,
        *,
        workload: str = "bundle",
        suspect_until: float = 0.0,
        prefix_sets: Callable[[str, str], Container[int] | None] | None = None,
    ) -> NodeView:
        """The view of a node as of a heartbeat received at `now` (the receiver's clock).

        `workload` comes from the node's deployment record (the heartbeat names the
        deployment, not its class). `suspect_until` is the router's own memory of a failure
        on this node; it is not in the heartbeat.

        When a heartbeat lists one model name at two versions, `slots[name]` is the hotter
        of the two (what a version-agnostic request would use) and `versions` has both.

        `prefix_sets(node_id, model)`: the blocks the router knows exactly the node holds
        for the model (a live set: `PrefixIndex.holder`), or None to use the heartbeat's.
        """
        slots: dict[str, ModelSlot] = {}
        versions: dict[tuple[str, str], ModelSlot] = {}
        for m in hb.models:
            held = prefix_sets(hb.node_id, m.name) if prefix_sets is not None else None
            slot = ModelSlot(
                name=m.name, version=m.version, tier=m.tier, in_flight=m.in_flight, queued=m.queued, max_batch=m.max_batch,
                prefix_hashes=held if held is not None else frozenset(m.recent_prefix_hashes) if m.recent_prefix_hashes else None,
            )
            versions[(m.name, m.version)] = slot
            held = slots.get(m.name)
            if held is None or TIER_RANK.get(m.tier, 9) < TIER_RANK.get(held.tier, 9):
                slots[m.name] = slot
        return cls(
            node_id=hb.node_id,
            region=hb.region,
            residency=hb.residency,
            queue_depth=hb.queue_depth,
            running=hb.running,
            max_batch=hb.max_batch,
            last_seen=now,
            interval_s=hb.interval_s,
            cordoned=hb.cordoned,
            draining=hb.draining,
            suspect_until=suspect_until,
            slots=slots,
            versions=versions,
            kv_usage=hb.kv_usage,
            deployment=hb.deployment,
            workload=workload,
            prefix_hashes=frozenset(hb.recent_prefix_hashes),
            queued_prompt_tokens=hb.queued_prompt_tokens,
        )

    def is_live(self, now: float, missed_beats: float = MISSED_BEATS) -> bool:
        """Heard from within `missed_beats` of its own heartbeat intervals (the same sum as
        `stale_after`, so the two never disagree by a rounding)."""
        return now <= self.last_seen + missed_beats * self.interval_s

    def takes_work(self, now: float) -> bool:
        """Live, not cordoned or draining, and not suspect: health alone, model aside."""
        return not self.blocked and now <= self.stale_after and self.suspect_until <= now

    def slot(self, model: str, version: str | None = None) -> ModelSlot | None:
        """The model on this node (at `version`, or the hottest version when None)."""
        if version is None:
            return self.slots.get(model)
        return self.versions.get((model, version))

    @property
    def load(self) -> float:
        """Work per batch slot: queued and running requests over the batch size."""
        return (self.queue_depth + self.running) / max(1, self.max_batch)


_VIEW_FIELDS: Final = NodeView.__slots__


@dataclass(frozen=True, slots=True)
class FleetIndex:
    """Node views grouped by the models they serve; build once per change, read per request.

    The router rebuilds it when its node table changes (or lazily, on the first decision
    after a change); policies take `index.serving(model)` so a decision never walks nodes
    that cannot serve the model.
    """

    nodes: tuple[NodeView, ...]
    by_model: Mapping[str, tuple[NodeView, ...]]

    @classmethod
    def build(cls, nodes: Iterable[NodeView]) -> FleetIndex:
        all_nodes = tuple(nodes)
        groups: dict[str, list[NodeView]] = {}
        for node in all_nodes:
            for model in node.slots:
                groups.setdefault(model, []).append(node)
        return cls(nodes=all_nodes, by_model={m: tuple(ns) for m, ns in groups.items()})

    def serving(self, model: str) -> tuple[NodeView, ...]:
        """Nodes that list `model` in any state (health is the filter's business)."""
        return self.by_model.get(model, ())
