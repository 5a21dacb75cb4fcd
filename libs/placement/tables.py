"""What a router (or the fleet simulator) knows of the fabric: nodes (from heartbeats) and models (from the registry).

Both tables are pure caches: the router feeds them from NATS (heartbeats, registry
watches), the simulator from its virtual nodes, so both place with the same bookkeeping
(`NodeTable.note_dispatch`) and the same switch costs (`ModelTable.switch_cost`).
Placement reads immutable `NodeView`s, so a heartbeat arriving mid-decision cannot
change the decision under it; decisions go through `CandidateIndex`, which follows the
table change by change (`NodeTable.watch`) instead of rebuilding anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Container
from dataclasses import dataclass, replace

from tierflow.contracts import messages, registry
from tierflow.placement.view import FleetIndex, ModelSlot, NodeView
from tierflow.rdu import ModelSpec, cold_load_time, load_catalog, load_profiles, model_from_dict, resident_bytes, switch_time
from tierflow.rdu.engine import DEFAULT_KV_CACHE_FRACTION, DEFAULT_SWITCH_PATIENCE
from tierflow.rdu.kvcache import DEFAULT_BLOCK_SIZE
from tierflow.rdu.timing import prefill_time
from tierflow.rdu.deployment import DeploymentConfig

__all__ = ["NodeTable", "ModelTable", "ModelRoute"]


class NodeTable:
    """Nodes as their heartbeats describe them (a shell checks each heartbeat first:
    `tierflow.placement.heartbeats`).

    `block_size` is the fabric's KV block size, fixed here: prompts are hashed with it for
    prefix placement, and no heartbeat can change it (one once did, for every prompt).

    `prefix_sets(node_id, model)`: where views take each model's cached blocks from when
    it answers (the router's `PrefixIndex.holder`, exact and live), else the heartbeat's
    recent hashes; settable after construction."""

    def __init__(
        self, *, suspect_seconds: float = 3.0, block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_sets: Callable[[str, str], Container[int] | None] | None = None,
    ) -> None:  # fmt: skip
        self.prefix_sets = prefix_sets
        self._decode: dict[str, NodeView] = {}
        self._prefill: dict[str, NodeView] = {}
        self._started: dict[str, float] = {}
        self._seq: dict[str, int] = {}  # the last heartbeat heard from each node
        self._marked: dict[str, int] = {}  # suspect nodes: the heartbeat heard when marked
        self._booked: dict[str, int] = {}  # prompt tokens this router sent each node since its last heartbeat
        self._suspect_seconds = suspect_seconds
        self._watchers: list[Callable[[str], None]] = []
        self.block_size = block_size  # the nodes' KV block size: prompts are hashed alike

    def watch(self, changed: Callable[[str], None]) -> None:
        """Call `changed(node_id)` after every change to a node's view (heard, dispatched
        to, marked suspect, forgotten): how `CandidateIndex` stays current without rebuilding."""
        self._watchers.append(changed)

    def _changed(self, node_id: str) -> None:
        for changed in self._watchers:
            changed(node_id)

    def apply(self, hb: messages.NodeHeartbeat, now: float, *, workload: str = "bundle") -> None:
        table = self._decode if hb.role == "decode" else self._prefill
        previous = table.get(hb.node_id)
        suspect_until = previous.suspect_until if previous else 0.0
        if self._started.get(hb.node_id) != hb.started_at:  # a restarted node starts with a clean slate
            suspect_until = 0.0
            self._started[hb.node_id] = hb.started_at
            self._marked.pop(hb.node_id, None)
        elif suspect_until:
            marked = self._marked.get(hb.node_id)
            # The second heartbeat after the failure was sent after it: the node is back
            # (the first may have been on its way already). After a NATS outage, when every
            # stream broke and every node was marked, this puts them back within an interval
            # or two of NATS returning instead of `suspect_seconds` later.
            if marked is not None and hb.seq >= marked + 2:
                suspect_until = 0.0
                del self._marked[hb.node_id]
        self._seq[hb.node_id] = hb.seq
        self._booked.pop(hb.node_id, None)  # the node's own count replaces the router's bookings
        table[hb.node_id] = NodeView.from_heartbeat(hb, now, workload=workload, suspect_until=suspect_until, prefix_sets=self.prefix_sets)
        self._changed(hb.node_id)

    def index(self) -> FleetIndex:
        """A snapshot of the decode views grouped by model (tools, tests); decisions use
        `CandidateIndex`, which needs no rebuild."""
        return FleetIndex.build(self._decode.values())

    @property
    def views(self) -> tuple[NodeView, ...]:
        return tuple(self._decode.values())

    def get(self, node_id: str) -> NodeView | None:
        return self._decode.get(node_id)

    def prefill_nodes(self, deployment: str) -> list[NodeView]:
        return [n for n in self._prefill.values() if n.deployment == deployment]

    def _replace(self, node_id: str, **changes: object) -> None:
        for table in (self._decode, self._prefill):
            node = table.get(node_id)
            if node is not None:
                table[node_id] = replace(node, **changes)  # type: ignore[arg-type]
                self._changed(node_id)

    def mark_suspect(self, node_id: str, now: float) -> None:
        """A node failed a request: keep new work off it until it proves alive again (its
        second heartbeat from now, or `suspect_seconds`, whichever comes first)."""
        self._marked[node_id] = self._seq.get(node_id, 0)
        self._replace(node_id, suspect_until=now + self._suspect_seconds)

    def note_dispatch(self, node_id: str, model: str, *, evicts: Collection[str] = (), prompt_tokens: int = 0) -> None:
        """What a dispatch will do to a node, until its next heartbeat says what it did:
        one more request queued with `prompt_tokens` to prefill (its prompt less what the
        node has cached), the model brought into HBM and, when HBM is full, the
        models it may push out (`evicts`, see `ModelTable.at_risk`) back in DDR. Without this, every decision
        within a heartbeat interval sees the same stale node and herds onto it."""
        node = self._decode.get(node_id) or self._prefill.get(node_id)
        if node is None:
            return
        if prompt_tokens:
            self._booked[node_id] = self._booked.get(node_id, 0) + prompt_tokens
        slot = node.slots.get(model)
        if slot is None:
            self._put(node_id, node.dispatched(prompt_tokens=prompt_tokens))
            return

        def predicted(s: ModelSlot) -> ModelSlot | None:
            if s.name != model and s.name not in evicts:
                return None
            hot = s.name == model  # built directly: `dataclasses.replace` costs several times more, per dispatch
            return ModelSlot(
                name=s.name, version=s.version, tier="hbm" if hot else "ddr", in_flight=s.in_flight,
                queued=s.queued + hot, max_batch=s.max_batch, prefix_hashes=s.prefix_hashes,
            )  # fmt: skip

        slots, versions = node.remap_slots(predicted)
        self._put(node_id, node.dispatched(slots, versions, prompt_tokens=prompt_tokens))

    # A prompt under one KV block prefills in well under a millisecond: its first token
    # does not move the node's view (a view change costs the router ~15 us), its end does.
    START_TOKENS = 64

    def note_started(self, node_id: str, model: str, prompt_tokens: int = 0) -> bool:
        """A request's first token came back: it moved from the node's queue to its batch,
        and its prompt is no longer queued for prefill; returns whether the view changed
        (not for a prompt under `START_TOKENS`). Without this a request would look queued
        until the next heartbeat, and the node that just reported would look emptier than
        the rest and draw every request until its bookings caught up (a herd at high rates)."""
        if prompt_tokens < self.START_TOKENS:
            return False
        self._left_queue(node_id, model, prompt_tokens, in_flight=1)
        return True

    def note_ended(self, node_id: str, model: str, *, started: bool, prompt_tokens: int = 0) -> None:
        """A request the router sent `node_id` is done there (finished, refused, or its leg
        failed): out of the batch if `note_started` moved it there, else out of the queue
        with its booked prompt. Until the node's next heartbeat says what it holds."""
        if started:
            node = self._decode.get(node_id) or self._prefill.get(node_id)
            if node is not None:
                self._put(node_id, node.adjusted(model, in_flight=-1))
        else:
            self._left_queue(node_id, model, prompt_tokens, in_flight=0)

    def _left_queue(self, node_id: str, model: str, prompt_tokens: int, *, in_flight: int) -> None:
        """Of the prompt, only what this router booked since the node's last heartbeat is
        taken back (a heartbeat's count already left it out, or will)."""
        booked = self._booked.get(node_id, 0)
        take = min(booked, prompt_tokens)
        if take:
            self._booked[node_id] = booked - take
        node = self._decode.get(node_id) or self._prefill.get(node_id)
        if node is not None:
            self._put(node_id, node.adjusted(model, queued=-1, in_flight=in_flight, prompt_tokens=take))

    def _put(self, node_id: str, view: NodeView) -> None:
        table = self._decode if node_id in self._decode else self._prefill
        table[node_id] = view
        self._changed(node_id)

    def may_return(self, model: str, now: float, *, within: float) -> bool:
        """Whether a node serving `model` is out only for a moment: suspect, or silent for
        less than `within` seconds (its NATS link broke, it is restarting). A request that
        finds no node may wait for one of these rather than fail at once; a node that was
        cordoned, is draining or went silent long ago is not coming back soon."""
        for node in self._decode.values():
            if model not in node.slots or node.blocked:
                continue
            if node.suspect_until > now or node.stale_after < now <= node.stale_after + within:
                return True
        return False

    def live(self, now: float) -> list[NodeView]:
        return [n for n in self._decode.values() if n.is_live(now)]

    def forget_dead(self, now: float, *, after_beats: float = 30.0) -> None:
        for table in (self._decode, self._prefill):
            dead = [k for k, n in table.items() if not n.is_live(now, after_beats)]
            for k in dead:
                del table[k]
                self._seq.pop(k, None)
                self._marked.pop(k, None)
                self._booked.pop(k, None)
                self._changed(k)


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """How a model name resolves: its versions' traffic weights and its context limit."""

    name: str
    default_version: str
    weights: tuple[tuple[str, float], ...]
    max_context: int
    created_at: float
    # What the model does (tierflow.rdu.catalog.ModelKind): each endpoint serves one kind.
    kind: str = "generate"
    embedding_dims: int = 0  # an embedder's vector length
    matryoshka_dims: tuple[int, ...] = ()  # shorter lengths it may be truncated to

    def pick_version(self, rng: random.Random) -> str:
        if len(self.weights) <= 1:
            return self.weights[0][0] if self.weights else self.default_version
        total = sum(w for _, w in self.weights)
        x = rng.random() * total
        for version, weight in self.weights:
            x -= weight
            if x < 0:
                return version
        return self.weights[-1][0]


class ModelTable:
    """Models that are registered *and* deployed; only those are served and listed.

    It also knows what bringing a model into HBM costs on each deployment's hardware
    (the emulator's own timing model over the model's shape and the profile's links), which
    hotness-aware placement uses instead of one guess for every model (`switch_cost`).
    """

    # Used when a model's shape or a deployment's profile is unknown here.
    FALLBACK_SECONDS = {"hbm": 0.0, "sram": 0.0, "ddr": 0.2, "loading": 0.5, "cold": 6.0}

    # How much each finished request moves a model's decode-time estimate.
    DECODE_EWMA_ALPHA = 0.1

    def __init__(self, *, drain_seconds: float = 2.0) -> None:
        # About one request's decode: what a switch waits per batch of the victim's work,
        # until requests of the victim's model have been observed (`observe_decode`).
        self.drain_seconds = drain_seconds
        self._decode_s: dict[str, float] = {}
        self._models: dict[str, registry.ModelRecord] = {}
        self._deployments: dict[str, registry.DeploymentRecord] = {}
        self.routes: dict[str, ModelRoute] = {}
        self._tier_seconds: dict[tuple[str, str], dict[str, float]] = {}
        self._prefill_s: dict[tuple[str, str], float] = {}  # (deployment, model) -> seconds per prompt token
        self._resident: dict[tuple[str, str], float] = {}  # (deployment, model) -> bytes in HBM when served
        self._weights_room: dict[str, float] = {}  # deployment -> HBM bytes for weights
        self._catalog = load_catalog(None)
        self._profiles = load_profiles(None)

    def put_model(self, record: registry.ModelRecord) -> None:
        self._models[record.name] = record
        self._rebuild()

    def delete_model(self, name: str) -> None:
        self._models.pop(name, None)
        self._rebuild()

    def put_deployment(self, record: registry.DeploymentRecord) -> None:
        self._deployments[record.name] = record
        self._rebuild()

    def delete_deployment(self, name: str) -> None:
        self._deployments.pop(name, None)
        self._rebuild()

    def deployment(self, name: str) -> registry.DeploymentRecord | None:
        return self._deployments.get(name)

    def switch_cost(self, node: NodeView, slot: ModelSlot) -> float:
        """Seconds until `slot`'s model can run on `node` (placement's `SwitchCost`).

        Bringing a model in when HBM is full also evicts a hot one, and that is not free:
        the engine never evicts a model with requests in flight, so the switch first waits
        for the victim's batch to drain (`drain_seconds` per batch of its work), and the
        victim's next request pays to bring it back. Both are counted, so placement queues
        behind a hot model rather than start a ping-pong of switches on a full node.
        And while other models have work on the node, the engine starts a switch only once
        the request has waited its switch patience (`DEFAULT_SWITCH_PATIENCE`).
        """
        dep = node.deployment
        seconds = self._tier_seconds.get((dep, slot.name), self.FALLBACK_SECONDS)
        cost = seconds.get(slot.tier, self.FALLBACK_SECONDS["cold"])
        if slot.tier in ("hbm", "sram"):
            return cost
        if node.running + node.queue_depth > slot.in_flight + slot.queued:
            cost += DEFAULT_SWITCH_PATIENCE
        victim = self._victim(node, slot.name)
        if victim is not None:
            reload = self._tier_seconds.get((dep, victim.name), self.FALLBACK_SECONDS)["ddr"]
            drain = self._decode_s.get(victim.name, self.drain_seconds)
            cost += reload + drain * (victim.in_flight + victim.queued) / max(1, victim.max_batch)
        return cost

    # A prompt of this many tokens sets a model's seconds per prompt token: long enough that
    # the pass's fixed overhead is a small share, short enough that attention (quadratic)
    # does not yet dominate; a cached prefix saves about this rate per token at any length
    # (its KV is still read as context), within ~10% for 8B to 70B models on sn40l.
    PREFILL_RATE_TOKENS = 4096

    def prefill_rate(self, node: NodeView, slot: ModelSlot) -> float | None:
        """Seconds `node` spends prefilling one prompt token of `slot`'s model (placement's
        `PrefillRate`), from the emulator's timing model over the model's shape and the
        deployment's profile; None when either is unknown here."""
        return self._prefill_s.get((node.deployment, slot.name))

    def observe_decode(self, model: str, seconds: float) -> None:
        """A finished request of `model` decoded for `seconds` (first token to last).

        What a request waits for a slot in a full batch, or for a busy model to drain
        before it can be switched out, is about one such decode; it depends on how long
        the workload's answers are, which no fixed setting knows, so it is measured.
        """
        held = self._decode_s.get(model)
        self._decode_s[model] = seconds if held is None else held + self.DECODE_EWMA_ALPHA * (seconds - held)

    def batch_turn(self, model: str) -> float | None:
        """Seconds a request of `model` waits per batch of work ahead of it (placement's
        `BatchTurn`); None until a request of the model has been observed."""
        return self._decode_s.get(model)

    def _victim(self, node: NodeView, model: str) -> ModelSlot | None:
        """The hot model that bringing `model` into HBM would push out: None when it fits
        beside the others (or sizes are unknown); else the idlest, then the smallest."""
        dep = node.deployment
        room, need = self._weights_room.get(dep), self._resident.get((dep, model))
        if room is None or need is None:
            return None
        hot = [s for s in node.slots.values() if s.name != model and s.tier in ("hbm", "sram", "loading")]
        if not hot or sum(self._resident.get((dep, s.name), 0.0) for s in hot) + need <= room:
            return None
        return min(hot, key=lambda s: (s.in_flight + s.queued, self._resident.get((dep, s.name), 0.0)))

    def _spec(self, model: registry.ModelRecord, version_name: str) -> ModelSpec | None:
        """A version's architecture: its bring-your-own spec or its catalog entry."""
        version = next((v for v in model.versions if v.version == version_name), None)
        if version is None:
            return None
        try:
            return model_from_dict(version.spec, name=model.name) if version.spec else self._catalog.get(version.catalog or model.name)
        except ValueError:
            return None

    def _costs(self, dep: registry.DeploymentRecord) -> None:
        profile = self._profiles.get(dep.profile)
        for entry in dep.models:
            model = self._models.get(entry.model)
            version = next((v for v in model.versions if v.version == entry.version), None) if model else None
            spec = None
            if version is not None:
                try:
                    spec = model_from_dict(version.spec, name=entry.model) if version.spec else self._catalog.get(version.catalog or entry.model)
                except ValueError:
                    spec = None
            if profile is None or spec is None:
                continue
            switch = switch_time(spec, profile)
            self._resident[(dep.name, entry.model)] = resident_bytes(spec, profile)
            self._weights_room[dep.name] = profile.hbm_capacity * (1 - DEFAULT_KV_CACHE_FRACTION)
            n = self.PREFILL_RATE_TOKENS
            self._prefill_s[(dep.name, entry.model)] = prefill_time(spec, profile, ((n, 0),)) / n
            self._tier_seconds[(dep.name, entry.model)] = {
                "hbm": 0.0, "sram": 0.0, "ddr": switch, "loading": switch, "cold": cold_load_time(spec, profile),
            }

    def at_risk(self, node: NodeView, model: str) -> tuple[str, ...]:
        """The hot models that bringing `model` into HBM on `node` may push out, for
        `NodeTable.note_dispatch` to mark out of HBM until the node's next heartbeat.

        The engine picks its victim when the switch happens (the coldest idle model then),
        not when the router dispatches, so predicting one victim sends the others' requests
        to a node about to evict them. Every idle hot model is at risk (or the idlest one
        when none is idle): requests for them go where they are safely hot instead.
        """
        slot = node.slots.get(model)
        if slot is None or slot.tier in ("hbm", "sram"):
            return ()
        victim = self._victim(node, model)
        if victim is None:
            return ()
        idle = tuple(s.name for s in node.slots.values() if s.name != model and s.tier in ("hbm", "sram") and not s.in_flight + s.queued)
        return idle or (victim.name,)

    def workload(self, deployment: str) -> str:
        dep = self._deployments.get(deployment)
        return dep.workload if dep is not None else "bundle"

    def _rebuild(self) -> None:
        context: dict[str, int] = {}
        for dep in self._deployments.values():
            for entry in dep.models:
                context[entry.model] = max(context.get(entry.model, 0), _seq_len(entry.config))
        routes = {}
        for name, m in self._models.items():
            if name not in context:
                continue
            weights = tuple((v, w) for v, w in sorted(m.traffic.items()) if w > 0) or ((m.default_version, 1.0),)
            spec = self._spec(m, m.default_version)
            routes[name] = ModelRoute(
                name=name, default_version=m.default_version, weights=weights, max_context=context[name], created_at=m.created_at,
                kind=spec.kind if spec else "generate", embedding_dims=spec.embedding_dims if spec else 0,
                matryoshka_dims=spec.matryoshka_dims if spec else (),
            )
        self.routes = routes
        self._tier_seconds, self._resident, self._weights_room, self._prefill_s = {}, {}, {}, {}
        for dep in self._deployments.values():
            self._costs(dep)


def _seq_len(config: str) -> int:
    """The sequence length of a configuration name like `ss8192-bs4` (0 if malformed:
    the registry validates configurations, so a malformed one here serves nothing)."""
    try:
        return DeploymentConfig.parse(config).seq_len
    except ValueError:
        return 0
