"""Wiring: the one place that picks the autoscaler's adapters (NATS, clock, actuator).

`bootstrap()` returns an `AutoscalerService` whose `start()` feeds the fleet view from
node heartbeats and the registry's KV bucket, and whose `run()` ticks the policy. Tests
call the same function with an in-memory actuator, a fake node control or a
VirtualClock; nothing else differs from production.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages, registry, subjects
from tierflow.runtime.clock import Clock, WallClock
from tierflow.runtime.kv import follow
from tierflow.services.autoscaler.actuators import Actuator, make_actuator
from tierflow.scaling.fleet import FleetView
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.node_control import NatsNodeControl, NodeControl
from tierflow.services.autoscaler.scaler import Autoscaler
from tierflow.services.autoscaler.settings import Settings

__all__ = ["AutoscalerService", "bootstrap"]

log = logging.getLogger(__name__)
_FROM_SETTINGS: Any = object()


@dataclass
class AutoscalerService:
    nc: NATS
    settings: Settings
    autoscaler: Autoscaler
    clock: Clock
    synced: asyncio.Event = field(default_factory=asyncio.Event)  # the registry snapshot is loaded
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _subs: list[Any] = field(default_factory=list)

    @property
    def fleet(self) -> FleetView:
        return self.autoscaler.fleet

    async def start(self, stopping: asyncio.Event) -> None:
        fleet, clock = self.fleet, self.clock

        async def on_heartbeat(msg: Any) -> None:
            try:
                fleet.heard(messages.heartbeat_decoder.decode(msg.data), clock.monotonic())
            except msgspec.DecodeError as exc:
                log.warning("bad heartbeat on %s: %s", msg.subject, exc)

        def on_put(key: str, value: bytes, revision: int) -> None:
            try:
                fleet.put_deployment(registry.deployment_decoder.decode(value))
            except msgspec.DecodeError as exc:
                log.warning("bad deployment record %s: %s", key, exc)

        def on_delete(key: str) -> None:
            fleet.delete_deployment(key.partition(".")[2])

        self._subs.append(await self.nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_heartbeat))
        self._tasks.append(asyncio.create_task(
            follow(self.nc.jetstream(), subjects.REGISTRY_BUCKET, subjects.DEPLOYMENT_KEYS, on_put=on_put,
                   on_delete=on_delete, on_snapshot=self.synced.set, stopping=stopping),
            name="registry-watch",
        ))  # fmt: skip

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick the policy once the registry snapshot is in and the warm-up has passed."""
        warmed = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._warm_up(warmed), name="warm-up"))
        await self.autoscaler.run(stopping, self.settings.interval, ready=warmed)

    async def _warm_up(self, warmed: asyncio.Event) -> None:
        # Counted from the snapshot: the deployments must be known for nodes to count.
        await self.synced.wait()
        await self.clock.sleep(self.settings.warm_up_s())
        log.info("autoscaler: heard heartbeats for %gs; deciding from now on", self.settings.warm_up_s())
        warmed.set()

    async def close(self) -> None:
        await self.autoscaler.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be closing already
                pass


def bootstrap(
    nc: NATS,
    settings: Settings,
    *,
    clock: Clock | None = None,
    metrics: CollectorRegistry | None = None,
    actuator: Actuator | None = _FROM_SETTINGS,
    control: NodeControl | None = None,
    drain_poll: float = 0.25,
) -> AutoscalerService:
    """The autoscaler with its adapters: by default, those `settings` name."""
    clock = clock if clock is not None else WallClock()
    chosen = make_actuator(settings.actuator, nc, settings) if actuator is _FROM_SETTINGS else actuator

    async def publish(data: bytes) -> None:
        await nc.publish(subjects.AUTOSCALER_DECISIONS, data)

    scaler = Autoscaler(
        FleetView(forget_after=3 * settings.max_signal_age),
        chosen,
        control if control is not None else NatsNodeControl(nc),
        publish,
        clock,
        settings.scaling(),
        AutoscalerMetrics(metrics if metrics is not None else CollectorRegistry()),
        drain_timeout=settings.drain_timeout,
        start_timeout=settings.start_timeout,
        drain_poll=drain_poll,
    )
    return AutoscalerService(nc=nc, settings=settings, autoscaler=scaler, clock=clock)
