"""What the router knows of the fabric: nodes (from heartbeats) and models (from the registry).

Both tables are caches fed by NATS; placement reads immutable `NodeView` snapshots of
them, so a heartbeat arriving mid-decision cannot change the decision under it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from tierflow.contracts import messages, registry
from tierflow.placement import NodeView
from tierflow.rdu.deployment import DeploymentConfig

__all__ = ["NodeTable", "ModelTable", "ModelRoute"]


class NodeTable:
    def __init__(self, *, suspect_seconds: float = 3.0) -> None:
        self._nodes: dict[str, NodeView] = {}
        self._started: dict[str, float] = {}
        self._suspect_seconds = suspect_seconds
        self.views: tuple[NodeView, ...] = ()

    def apply(self, hb: messages.NodeHeartbeat, now: float) -> None:
        if hb.role != "decode":
            return
        previous = self._nodes.get(hb.node_id)
        suspect_until = previous.suspect_until if previous else 0.0
        if self._started.get(hb.node_id) != hb.started_at:  # a restarted node starts with a clean slate
            suspect_until = 0.0
            self._started[hb.node_id] = hb.started_at
        self._nodes[hb.node_id] = NodeView(
            node_id=hb.node_id,
            models=frozenset(m.name for m in hb.models),
            tiers={m.name: m.tier for m in hb.models},
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
        )
        self.views = tuple(self._nodes.values())

    def mark_suspect(self, node_id: str, now: float) -> None:
        """A node failed a request: keep new work off it until it proves alive again."""
        node = self._nodes.get(node_id)
        if node is not None:
            self._nodes[node_id] = replace(node, suspect_until=now + self._suspect_seconds)
            self.views = tuple(self._nodes.values())

    def note_dispatch(self, node_id: str) -> None:
        """Count a request against a node until its next heartbeat reports real load."""
        node = self._nodes.get(node_id)
        if node is not None:
            self._nodes[node_id] = replace(node, queue_depth=node.queue_depth + 1)
            self.views = tuple(self._nodes.values())

    def live(self, now: float) -> list[NodeView]:
        return [n for n in self._nodes.values() if n.is_live(now)]

    def forget_dead(self, now: float, *, after_beats: float = 30.0) -> None:
        dead = [k for k, n in self._nodes.items() if not n.is_live(now, after_beats)]
        for k in dead:
            del self._nodes[k]
        if dead:
            self.views = tuple(self._nodes.values())


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """How a model name resolves: its versions' traffic weights and its context limit."""

    name: str
    default_version: str
    weights: tuple[tuple[str, float], ...]
    max_context: int
    created_at: float

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
    """Models that are registered *and* deployed; only those are served and listed."""

    def __init__(self) -> None:
        self._models: dict[str, registry.ModelRecord] = {}
        self._deployments: dict[str, registry.DeploymentRecord] = {}
        self.routes: dict[str, ModelRoute] = {}

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
            routes[name] = ModelRoute(name=name, default_version=m.default_version, weights=weights, max_context=context[name], created_at=m.created_at)
        self.routes = routes


def _seq_len(config: str) -> int:
    """The sequence length of a configuration name like `ss8192-bs4` (0 if malformed:
    the registry validates configurations, so a malformed one here serves nothing)."""
    try:
        return DeploymentConfig.parse(config).seq_len
    except ValueError:
        return 0
