"""The imperative shell around tierflow.scaling: snapshot -> tick -> publish -> act.

Every `tick()` builds one snapshot per deployment from the fleet view and the actuator's
inventory, runs the pure state machine, publishes every pool's decision (holds too) on
`subjects.AUTOSCALER_DECISIONS` with its inputs and reason, counts it, logs the ones
that change something, and carries them out:

- up: first take back nodes it is still draining (uncordon: warm capacity at once),
  then ask the actuator for the rest;
- down: pick the cheapest nodes (`choose_victims`), and for each, in the background,
  drain it over its control endpoint (cordon; the router stops sending at its next
  heartbeat), wait until nothing is in flight (or `drain_timeout`), then have the
  actuator stop it. Nothing in flight is lost: the node is empty when it is stopped,
  and even then it drains itself on SIGTERM.

A failed actuation is logged and counted; the next tick sees the fleet as it is and
decides again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tierflow.contracts import messages, registry
from tierflow.runtime.clock import Clock
from tierflow.runtime.waiting import first
from tierflow.scaling import Decision, DeploymentState, PoolDecision, ScalingConfig, choose_victims, tick
from tierflow.scaling.fleet import FleetView, pool_bounds
from tierflow.services.autoscaler.actuators import Actuator, ActuatorError, SupportsInventory
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.node_control import NodeControl, NodeControlError

__all__ = ["Autoscaler"]

log = logging.getLogger("tierflow.autoscaler")
Publish = Callable[[bytes], Awaitable[None]]
STATUS_FAILURES_BEFORE_GONE = 3


@dataclass(slots=True)
class _Removal:
    node_id: str
    task: asyncio.Task[None] | None = None
    stopping: bool = False  # past the drain: too late to take it back


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
    ) -> None:
        self.fleet = fleet
        self.actuator = actuator
        self._control = control
        self._publish = publish
        self._clock = clock
        self.config = config
        self._metrics = metrics
        self._drain_timeout = drain_timeout
        self._start_timeout = start_timeout
        self._drain_poll = drain_poll
        self.states: dict[str, DeploymentState] = {}
        self._removals: dict[tuple[str, str], dict[str, _Removal]] = {}
        self._pending: dict[tuple[str, str], list[float]] = {}  # start times, for actuators without inventory
        self._known: dict[tuple[str, str], set[str]] = {}
        self._bad_bounds: set[str] = set()

    @property
    def actuator_name(self) -> str:
        return self.actuator.name if self.actuator is not None else "none"

    def removing(self, deployment: str, pool: str) -> list[str]:
        """Nodes being drained and stopped right now."""
        return list(self._removals.get((deployment, pool), {}))

    # -- the tick ---------------------------------------------------------------------
    async def tick(self) -> list[Decision]:
        """Decide (and act) once for every deployment in the registry."""
        now = self._clock.monotonic()
        self.fleet.expire(now)
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
            removing = {pool: len(self._removals.get((name, pool), {})) for pool in bounds}
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
        busy = set(self._removals.get((record.name, decision.pool), {}))
        return choose_victims(self.fleet.candidates(record.name, decision.pool, now, exclude=busy), decision.current - decision.desired)

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
        if self.actuator is None or d.action == "hold":
            return
        if d.action == "up":
            await self._scale_up(record, d.pool, d.desired - d.current)
        else:
            for node_id in victims:
                removal = _Removal(node_id)
                self._removals.setdefault((record.name, d.pool), {})[node_id] = removal
                removal.task = asyncio.create_task(self._remove(record, d.pool, removal), name=f"remove-{node_id}")

    async def _scale_up(self, record: registry.DeploymentRecord, pool: str, count: int) -> None:
        assert self.actuator is not None
        key = (record.name, pool)
        for removal in [r for r in self._removals.get(key, {}).values() if not r.stopping][:count]:
            await self._reclaim(record, pool, removal)
            count -= 1
        if count <= 0:
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

    async def _reclaim(self, record: registry.DeploymentRecord, pool: str, removal: _Removal) -> None:
        """Load came back while a node drained: cancel its removal and put it back in rotation."""
        if removal.task is not None:
            removal.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await removal.task
        try:
            await self._control.command(removal.node_id, "uncordon")
            self._metrics.actuations.labels(record.name, pool, "reclaim", "ok").inc()
            log.info("deployment %s/%s: took %s back (uncordoned)", record.name, pool, removal.node_id)
        except NodeControlError as exc:
            self._metrics.actuations.labels(record.name, pool, "reclaim", "error").inc()
            log.warning("deployment %s/%s: could not uncordon %s: %s", record.name, pool, removal.node_id, exc)

    async def _remove(self, record: registry.DeploymentRecord, pool: str, removal: _Removal) -> None:
        """cordon (drain) -> wait until empty -> stop. Runs as its own task per node."""
        assert self.actuator is not None
        node_id, key = removal.node_id, (record.name, pool)
        began = self._clock.monotonic()
        try:
            try:
                in_flight = (await self._control.command(node_id, "drain")).in_flight
            except NodeControlError as exc:
                self._metrics.actuations.labels(record.name, pool, "drain", "error").inc()
                log.warning("deployment %s/%s: not removing %s: %s", record.name, pool, node_id, exc)
                return
            failures = 0
            while in_flight > 0 and self._clock.monotonic() - began < self._drain_timeout and failures < STATUS_FAILURES_BEFORE_GONE:
                await self._clock.sleep(self._drain_poll)
                try:
                    in_flight = (await self._control.command(node_id, "status")).in_flight
                    failures = 0
                except NodeControlError:
                    failures += 1  # it may have died; after a few misses it is treated as gone
            drained = self._clock.monotonic() - began
            self._metrics.drain_seconds.labels(record.name, pool).observe(drained)
            self._metrics.actuations.labels(record.name, pool, "drain", "ok" if in_flight == 0 else "timeout").inc()
            if in_flight > 0 and failures < STATUS_FAILURES_BEFORE_GONE:
                log.warning("deployment %s/%s: %s still has %d request(s) after %.0fs; stopping it (it drains itself on SIGTERM)",
                            record.name, pool, node_id, in_flight, drained)  # fmt: skip
            removal.stopping = True
            try:
                await self.actuator.stop_node(record, pool, node_id)
            except ActuatorError as exc:
                self._metrics.actuations.labels(record.name, pool, "stop", "error").inc()
                log.warning("deployment %s/%s: could not stop %s (%s); putting it back in rotation", record.name, pool, node_id, exc)
                with contextlib.suppress(NodeControlError):
                    await self._control.command(node_id, "uncordon")
                return
            self.fleet.removed(node_id, self._clock.monotonic())
            self._metrics.actuations.labels(record.name, pool, "stop", "ok").inc()
            log.info("deployment %s/%s: removed %s (drained in %.2fs)", record.name, pool, node_id, drained,
                     extra={"fields": {"deployment": record.name, "pool": pool, "node": node_id, "drain_seconds": round(drained, 3)}})  # fmt: skip
        finally:
            self._removals.get(key, {}).pop(node_id, None)

    # -- running ----------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event, interval: float, *, ready: asyncio.Event | None = None) -> None:
        """Tick every `interval` until `stopping` (after `ready`, e.g. the registry snapshot)."""
        while not stopping.is_set():
            await first(self._clock.sleep(interval), stopping.wait())
            if stopping.is_set():
                break
            if ready is not None and not ready.is_set():
                continue
            try:
                await self.tick()
            except Exception:  # one bad tick must not end the autoscaler
                log.exception("autoscaler tick failed")

    async def close(self) -> None:
        """Stop removals still draining (their nodes go back in rotation); let stops finish."""
        for (deployment, pool), removals in list(self._removals.items()):
            for removal in list(removals.values()):
                if removal.stopping:
                    if removal.task is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(removal.task, 20.0)
                    continue
                record = self.fleet.deployments.get(deployment)
                if record is not None:
                    await self._reclaim(record, pool, removal)
                elif removal.task is not None:
                    removal.task.cancel()
