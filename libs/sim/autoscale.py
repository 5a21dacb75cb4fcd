"""The autoscaler in virtual time: the service's tick, with the simulator as its actuator.

Every `interval` (the service's default, 5 s) each deployment's pools are reduced to a
snapshot by the service's own `FleetView` (fed every heartbeat, as the service is) and
decided by `tierflow.scaling.tick` with the service's `ScalingConfig`. What the service
would then do is returned as `ScaleAction`s for the event loop to carry out:

- up: first take back nodes still draining (uncordon: warm capacity at once), then start
  new ones. Nodes asked for and not heard yet count as starting, from the actuator's
  inventory (the simulator knows exactly what it runs), as with an actuator that keeps one;
- down: the cheapest nodes (`choose_victims`) are drained: cordon, wait until nothing is
  in flight (polled every `drain_poll` seconds, up to `drain_timeout`), then stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Literal

import msgspec

from tierflow.contracts import messages
from tierflow.scaling import DeploymentState, ScalingConfig, choose_victims, tick
from tierflow.scaling.fleet import FleetView, pool_bounds
from tierflow.sim.fleet import DeploymentPlan

__all__ = ["SimAutoscaler", "ScaleAction", "ScaleEvent", "AUTOSCALER_INTERVAL_S", "DRAIN_POLL_S", "DRAIN_TIMEOUT_S"]

AUTOSCALER_INTERVAL_S: Final = 5.0  # the service's default `interval`
DRAIN_POLL_S: Final = 0.25  # how often the service asks a draining node how much it still holds
DRAIN_TIMEOUT_S: Final = 600.0  # the service's default `drain_timeout`


class ScaleAction(msgspec.Struct, frozen=True):
    """One thing to do: start `count` nodes of a pool, drain a node, or take one back."""

    kind: Literal["start", "drain", "reclaim"]
    deployment: str
    pool: str
    count: int = 0
    node_id: str = ""


class ScaleEvent(msgspec.Struct, frozen=True):
    """A decision that changed something, for the run's timeline."""

    t: float
    deployment: str
    pool: str
    action: str
    current: int
    desired: int
    signal: str


class SimAutoscaler:
    def __init__(self, plans: Sequence[DeploymentPlan], config: ScalingConfig) -> None:
        self.config = config
        self.fleet = FleetView(forget_after=3 * config.max_signal_age)  # as the service builds it
        for plan in plans:
            self.fleet.put_deployment(plan.record)
        self.states: dict[str, DeploymentState] = {}
        self.removing: dict[tuple[str, str], dict[str, float]] = {}  # pool -> node id -> drain began
        self.events: list[ScaleEvent] = []

    def heard(self, hb: messages.NodeHeartbeat, now: float) -> None:
        self.fleet.heard(hb, now)

    def tick(self, now: float, provisioned: Callable[[str, str], int]) -> list[ScaleAction]:
        """Decide once for every deployment; `provisioned(deployment, pool)` is how many
        nodes of the pool the simulator runs, started or not."""
        self.fleet.expire(now)
        actions: list[ScaleAction] = []
        for name, record in self.fleet.deployments.items():
            bounds = pool_bounds(record)
            starting = {pool: max(0, provisioned(name, pool) - len(self.fleet.live_ids(name, pool, now))) for pool in bounds}
            removing = {pool: len(self.removing.get((name, pool), {})) for pool in bounds}
            snapshot = self.fleet.deployment_snapshot(record, bounds, now, starting=starting, removing=removing)
            self.states[name], decision = tick(self.states.get(name), snapshot, now, self.config)
            for d in decision.pools:
                if d.action == "hold":
                    continue
                self.events.append(ScaleEvent(now, name, d.pool, d.action, d.current, d.desired, d.signal))
                actions += self._carry_out(name, d.pool, d.action, d.desired - d.current, now)
        return actions

    def _carry_out(self, deployment: str, pool: str, action: str, delta: int, now: float) -> list[ScaleAction]:
        key = (deployment, pool)
        draining = self.removing.setdefault(key, {})
        if action == "up":
            taken = list(draining)[:delta]
            for node_id in taken:
                del draining[node_id]
            out = [ScaleAction("reclaim", deployment, pool, node_id=n) for n in taken]
            if delta > len(taken):
                out.append(ScaleAction("start", deployment, pool, count=delta - len(taken)))
            return out
        victims = choose_victims(self.fleet.candidates(deployment, pool, now, exclude=set(draining)), -delta)
        for node_id in victims:
            draining[node_id] = now
        return [ScaleAction("drain", deployment, pool, node_id=n) for n in victims]

    def drain_began(self, deployment: str, pool: str, node_id: str) -> float | None:
        """When the drain of `node_id` began; None once it was taken back or stopped."""
        return self.removing.get((deployment, pool), {}).get(node_id)

    def stopped(self, deployment: str, pool: str, node_id: str, now: float) -> None:
        """The node was stopped: forget it and ignore its late heartbeats."""
        self.removing.get((deployment, pool), {}).pop(node_id, None)
        self.fleet.removed(node_id, now)
