"""The imperative shell around tierflow.scaling: snapshot -> tick -> publish -> act.

Every `tick()` builds one snapshot per deployment from the fleet view and the actuator's
inventory, runs the pure state machine, publishes every pool's decision (holds too) on
`subjects.AUTOSCALER_DECISIONS` with its inputs and reason, counts it, logs the ones
that change something, and carries them out:

- up: first take back nodes it is still draining (uncordon: warm capacity at once),
  then ask the actuator for the rest;
- down: pick the cheapest nodes (`choose_victims`; or the actuator's choice where the
  platform decides, `ChoosesVictims`) and hand each to the `Remover`
  (remover.py): record it in the removal book, drain it over its control endpoint
  (cordon; the router stops sending at its next heartbeat), wait until nothing is in
  flight (or `drain_timeout`), then have the actuator stop it. Nothing in flight is
  lost: the node is empty when it is stopped, and even then it drains itself on SIGTERM.

Each tick first takes over removal records no task here runs for (a predecessor's, after
a crash or a change of lease holder): the same tick's decision finishes or undoes them.
Only an instance holding the lease ticks (`run`), and every actuation checks it again
(`Gate`, lease.py): a standby publishes nothing and touches nothing.

A failed actuation is logged and counted; the next tick sees the fleet as it is and
decides again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tierflow.contracts import messages, registry
from tierflow.runtime.clock import Clock
from tierflow.runtime.waiting import first
from tierflow.scaling import Decision, DeploymentState, PoolDecision, ScalingConfig, choose_victims, tick
from tierflow.scaling.fleet import FleetView, pool_bounds
from tierflow.services.autoscaler.actuators import Actuator, ActuatorError, ChoosesVictims, SupportsInventory
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.node_control import NodeControl
from tierflow.services.autoscaler.removals import RemovalBook
from tierflow.services.autoscaler.remover import Gate, Remover, Solo

__all__ = ["Autoscaler"]

log = logging.getLogger("tierflow.autoscaler")
Publish = Callable[[bytes], Awaitable[None]]


class Autoscaler:
    def __init__(
        self,
        fleet: FleetView,
        actuator: Actuator | None,
        control: NodeControl,
        publish: Publish,
        clock: Clock,
        config: ScalingConfig,
        metrics: AutoscalerMetrics,
        *,
        drain_timeout: float = 600.0,
        start_timeout: float = 120.0,
        drain_poll: float = 0.25,
        book: RemovalBook | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.fleet = fleet
        self.actuator = actuator
        self._publish = publish
        self._clock = clock
        self.config = config
        self._metrics = metrics
        self.metrics = metrics  # the service's other loops count into it too (rejected heartbeats)
        self._start_timeout = start_timeout
        self._gate: Gate = gate if gate is not None else Solo()
        self._remover = (
            Remover(fleet, actuator, control, clock, metrics, book=book, gate=self._gate, drain_timeout=drain_timeout, drain_poll=drain_poll)
            if actuator is not None else None
        )  # fmt: skip
        self.states: dict[str, DeploymentState] = {}
        self._pending: dict[tuple[str, str], list[float]] = {}  # start times, for actuators without inventory
        self._known: dict[tuple[str, str], set[str]] = {}
        self._bad_bounds: set[str] = set()

    @property
    def actuator_name(self) -> str:
        return self.actuator.name if self.actuator is not None else "none"

    def removing(self, deployment: str, pool: str) -> list[str]:
        """Nodes being drained and stopped right now."""
        return self._remover.removing(deployment, pool) if self._remover is not None else []

    # -- the tick ---------------------------------------------------------------------
    async def tick(self) -> list[Decision]:
        """Decide (and act) once for every deployment in the registry."""
        now = self._clock.monotonic()
        self.fleet.expire(now)
        adopted = await self._remover.adopt(now) if self._remover is not None else []
        try:
            return await self._decide(now)
        finally:
            if self._remover is not None:
                self._remover.resume(adopted)

    async def _decide(self, now: float) -> list[Decision]:
        decisions = []
        for name, record in list(self.fleet.deployments.items()):
            try:
                bounds = pool_bounds(record)
            except ValueError as exc:
                if name not in self._bad_bounds:
                    log.error("deployment %s: cannot scale: %s", name, exc)
                    self._bad_bounds.add(name)
                continue
            self._bad_bounds.discard(name)
            starting = {pool: await self._starting(record, pool, now) for pool in bounds}
            removing = {pool: len(self.removing(name, pool)) for pool in bounds}
            snapshot = self.fleet.deployment_snapshot(record, bounds, now, starting=starting, removing=removing)
            self.states[name], decision = tick(self.states.get(name), snapshot, now, self.config)
            for pool_decision in decision.pools:
                victims = self._victims(record, pool_decision, now)
                await self._report(record, pool_decision, victims)
                await self._carry_out(record, pool_decision, victims)
            decisions.append(decision)
        return decisions

    async def _starting(self, record: registry.DeploymentRecord, pool: str, now: float) -> int:
        """Nodes asked for and not heard yet: from the actuator's inventory when it has one,
        else from the starts this process asked for (each newly heard node settles one)."""
        key = (record.name, pool)
        live = self.fleet.live_ids(record.name, pool, now)
        known = self._known.setdefault(key, set(live))
        newcomers = len(live - known)
        known |= live
        pending = [t for t in self._pending.get(key, []) if now - t <= self._start_timeout][newcomers:]
        self._pending[key] = pending
        if isinstance(self.actuator, SupportsInventory):
            try:
                return max(0, await self.actuator.provisioned(record, pool) - len(live))
            except ActuatorError as exc:
                log.warning("deployment %s/%s: inventory unavailable (%s); counting own starts", record.name, pool, exc)
        return len(pending)

    def _victims(self, record: registry.DeploymentRecord, decision: PoolDecision, now: float) -> list[str]:
        if decision.action != "down" or self.actuator is None:
            return []
        busy = set(self.removing(record.name, decision.pool))
        candidates, count = self.fleet.candidates(record.name, decision.pool, now, exclude=busy), decision.current - decision.desired
        if isinstance(self.actuator, ChoosesVictims):  # the platform decides which node goes (a StatefulSet: its highest ordinal)
            return self.actuator.choose_victims(record, decision.pool, candidates, count)
        return choose_victims(candidates, count)

    async def _report(self, record: registry.DeploymentRecord, d: PoolDecision, victims: list[str]) -> None:
        self._metrics.decisions.labels(record.name, d.pool, d.action, d.signal).inc()
        self._metrics.current.labels(record.name, d.pool).set(d.current)
        self._metrics.desired.labels(record.name, d.pool).set(d.desired)
        message = messages.AutoscalerDecision(
            deployment=record.name, at=self._clock.now(), current_replicas=d.current, desired_replicas=d.desired,
            reason=d.reason, inputs=d.inputs, pool=d.pool, action=d.action, signal=d.signal,  # type: ignore[arg-type]
            actuator=self.actuator_name, victims=victims,
        )  # fmt: skip
        await self._publish(messages.encoder.encode(message))
        if d.action != "hold":
            log.info(
                "scale %s %s/%s: %d -> %d (%s)", d.action, record.name, d.pool, d.current, d.desired, d.signal,
                extra={"fields": {
                    "deployment": record.name, "pool": d.pool, "action": d.action, "current": d.current,
                    "desired": d.desired, "signal": d.signal, "reason": d.reason, "inputs": d.inputs,
                    "victims": victims, "actuator": self.actuator_name,
                }},
            )  # fmt: skip

    # -- carrying decisions out -------------------------------------------------------
    async def _carry_out(self, record: registry.DeploymentRecord, d: PoolDecision, victims: list[str]) -> None:
        if self.actuator is None or self._remover is None or d.action == "hold":
            return
        if d.action == "up":
            await self._scale_up(record, d.pool, d.desired - d.current)
        else:
            for node_id in victims:
                self._remover.begin(record, d.pool, node_id)

    async def _scale_up(self, record: registry.DeploymentRecord, pool: str, count: int) -> None:
        assert self.actuator is not None and self._remover is not None
        key = (record.name, pool)
        count -= await self._remover.take_back(record.name, pool, count)  # warm capacity first
        if count <= 0 or not self._gate.may_act():
            return
        try:
            started = await self.actuator.start_nodes(record, pool, count)
        except ActuatorError as exc:
            self._metrics.actuations.labels(record.name, pool, "start", "error").inc()
            log.warning("deployment %s/%s: could not start %d node(s): %s", record.name, pool, count, exc)
            return
        self._metrics.actuations.labels(record.name, pool, "start", "ok").inc(count)
        self._pending.setdefault(key, []).extend([self._clock.monotonic()] * count)
        log.info("deployment %s/%s: started %s", record.name, pool, ", ".join(started) or f"{count} node(s)",
                 extra={"fields": {"deployment": record.name, "pool": pool, "started": started, "count": count}})  # fmt: skip

    # -- running ----------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event, interval: float, *, ready: asyncio.Event | None = None, wake: asyncio.Event | None = None) -> None:
        """Tick every `interval` until `stopping`, while this instance may act (the lease)
        and once `ready` (the registry snapshot and the warm-up). `wake` ticks at once (the
        lease was just taken: a predecessor's removals are finished or undone now)."""
        while not stopping.is_set():
            await first(self._clock.sleep(interval), stopping.wait(), *([wake.wait()] if wake is not None else []))
            if wake is not None:
                wake.clear()
            if stopping.is_set():
                break
            if (ready is not None and not ready.is_set()) or not self._gate.may_act():
                continue
            try:
                await self.tick()
            except Exception:  # one bad tick must not end the autoscaler
                log.exception("autoscaler tick failed")

    async def stand_down(self) -> None:
        """The lease is lost: stop every removal where it is (see Remover.stand_down)."""
        if self._remover is not None:
            await self._remover.stand_down()

    async def close(self) -> None:
        """Stop removals still draining (their nodes go back in rotation); let stops finish."""
        if self._remover is not None:
            await self._remover.close()
