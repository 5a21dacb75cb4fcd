"""How decisions become nodes: one `Actuator` protocol, several connectors, one factory.

    Actuator            start_nodes(deployment, pool, n) -> [node ids], stop_node(...)
    SupportsInventory   provisioned(deployment, pool) -> n   (optional: nodes it runs,
                        started or not; lets the shell count nodes still starting)
    ChoosesVictims      choose_victims(deployment, pool, nodes, n) -> [node ids]
                        (optional: for platforms that decide which node a scale-down
                        removes, a StatefulSet its highest ordinal; without it the shell
                        drains the cheapest nodes, tierflow.scaling.choose_victims)

Connectors: `LocalActuator` (asks `tierflow up` over NATS, tierflow.services.autoscaler.local),
`KubernetesActuator` (scales a Deployment, .kubernetes), `VirtualActuator` (in memory,
for the simulator and tests). "none" means no actuator: decisions are advisory.

The scale-down sequence (cordon -> drain -> stop) is the shell's, not the actuator's:
by the time `stop_node` is called the node is empty, so every connector can simply stop it.
`stop_node` must be idempotent: an autoscaler that takes over a removal its predecessor
had begun stopping (remover.py) asks again, and a node stopped once must not cost a
second replica.
Region and residency stay what the deployment says: local nodes read them from the
deployment record, Kubernetes keeps the Deployment's pod template untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from nats.aio.client import Client as NATS

from tierflow.contracts import registry
from tierflow.scaling.victims import NodeLoad

if TYPE_CHECKING:
    from tierflow.services.autoscaler.settings import Settings

__all__ = ["Actuator", "ActuatorError", "ChoosesVictims", "SupportsInventory", "VirtualActuator", "make_actuator"]


class ActuatorError(Exception):
    """The actuator could not do what it was asked (the shell logs it and retries next tick)."""


class Actuator(Protocol):
    name: str

    async def start_nodes(self, deployment: registry.DeploymentRecord, pool: str, count: int) -> list[str]:
        """Start `count` nodes of `pool`; the ids of the new nodes when known now."""
        ...

    async def stop_node(self, deployment: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        """Stop one node (already cordoned and drained by the caller); stopping it again is a no-op."""
        ...


@runtime_checkable
class SupportsInventory(Protocol):
    async def provisioned(self, deployment: registry.DeploymentRecord, pool: str) -> int:
        """Nodes of the pool this actuator runs now, whether they report yet or not."""
        ...


@runtime_checkable
class ChoosesVictims(Protocol):
    def choose_victims(self, deployment: registry.DeploymentRecord, pool: str, nodes: Sequence[NodeLoad], count: int) -> list[str]:
        """Up to `count` of `nodes` (the pool's live nodes, those being removed left out) to
        drain and stop: the ones this actuator's platform removes when the pool shrinks."""
        ...


class VirtualActuator:
    """Nodes as entries in a dict: what the simulator and the tests scale.

    `nodes` maps (deployment, pool) to the ids it runs; `calls` records every request.
    """

    name = "virtual"

    def __init__(self, initial: dict[tuple[str, str], list[str]] | None = None) -> None:
        self.nodes: dict[tuple[str, str], list[str]] = {k: list(v) for k, v in (initial or {}).items()}
        self.calls: list[tuple[str, str, str, str | int]] = []
        self._ids = itertools.count()

    async def start_nodes(self, deployment: registry.DeploymentRecord, pool: str, count: int) -> list[str]:
        new = [f"{deployment.name}-{pool}-v{next(self._ids)}" for _ in range(count)]
        self.nodes.setdefault((deployment.name, pool), []).extend(new)
        self.calls.append(("start", deployment.name, pool, count))
        return new

    async def stop_node(self, deployment: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        self.calls.append(("stop", deployment.name, pool, node_id))
        running = self.nodes.get((deployment.name, pool), [])
        if node_id in running:
            running.remove(node_id)

    async def provisioned(self, deployment: registry.DeploymentRecord, pool: str) -> int:
        return len(self.nodes.get((deployment.name, pool), []))


def make_actuator(name: str, nc: NATS, settings: Settings) -> Actuator | None:
    """The one place an actuator is chosen by name (settings.actuator)."""
    if name == "none":
        return None
    if name == "local":
        from tierflow.services.autoscaler.local import LocalActuator

        return LocalActuator(nc, timeout=settings.actuation_timeout)
    if name == "kubernetes":
        from tierflow.services.autoscaler.kubernetes import KubernetesActuator

        return KubernetesActuator.from_settings(settings)
    raise ValueError(f"unknown actuator {name!r} (local, kubernetes or none)")
