"""Wiring: the one place that picks the autoscaler's adapters (NATS, KV, clock, actuator).

`bootstrap()` returns an `AutoscalerService`. Its `start()` creates the autoscaler's KV
bucket, feeds the fleet view from node heartbeats and the registry's KV bucket, and
keeps (or waits for) the lease; `run()` ticks the policy while the lease is held. Every
long-lived loop (registry watch, lease, tick) runs under `runtime.supervise.supervised`,
so an exception logs, backs off and resumes instead of ending it. Tests call the same
function with an in-memory actuator, a fake node control or a VirtualClock; nothing
else differs from production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry

from tierflow.contracts import registry, subjects
from tierflow.placement.heartbeats import HeartbeatGate
from tierflow.runtime.audit import AuditLog
from tierflow.runtime.clock import Clock, WallClock
from tierflow.runtime.kv import follow
from tierflow.runtime.supervise import supervised
from tierflow.scaling.fleet import FleetView
from tierflow.services.autoscaler.actuators import Actuator, make_actuator
from tierflow.services.autoscaler.lease import LeaseKeeper
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.audited import AuditedActuator
from tierflow.services.autoscaler.node_control import NatsNodeControl, NodeControl
from tierflow.services.autoscaler.removals import KvRemovalBook, open_autoscaler_bucket
from tierflow.services.autoscaler.scaler import Autoscaler
from tierflow.services.autoscaler.settings import Settings

__all__ = ["AutoscalerService", "bootstrap", "default_holder"]

log = logging.getLogger(__name__)
_FROM_SETTINGS: Any = object()


def default_holder(instance: str = "") -> str:
    """A lease holder id unique to this process: a restarted one is a new holder."""
    return f"{instance or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _Bucket:
    """The autoscaler's KV bucket, created on first use and kept (retried until it works)."""

    def __init__(self, js: JetStreamContext, replicas: int) -> None:
        self._js = js
        self._replicas = replicas
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> KeyValue:
        async with self._lock:
            if self._kv is None:
                self._kv = await open_autoscaler_bucket(self._js, replicas=self._replicas)
            return self._kv


@dataclass
class AutoscalerService:
    nc: NATS
    settings: Settings
    autoscaler: Autoscaler
    clock: Clock
    lease: LeaseKeeper
    bucket: _Bucket
    synced: asyncio.Event = field(default_factory=asyncio.Event)  # the registry snapshot is loaded
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # the lease was just taken: tick now
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _subs: list[Any] = field(default_factory=list)

    @property
    def fleet(self) -> FleetView:
        return self.autoscaler.fleet

    async def start(self, stopping: asyncio.Event) -> None:
        fleet, clock = self.fleet, self.clock

        # Checked like the router's (bounds, subject, registry): a lying heartbeat must not
        # hide load or invent capacity (tierflow.placement.heartbeats).
        counter = self.autoscaler.metrics.heartbeats_rejected
        heartbeats = HeartbeatGate(clock, deployment=fleet.deployments.get, on_reject=lambda reason: counter.labels(reason).inc())

        async def on_heartbeat(msg: Any) -> None:
            hb = heartbeats.admit(msg.subject, msg.data)
            if hb is not None:
                fleet.heard(hb, clock.monotonic())

        def on_put(key: str, value: bytes, revision: int) -> None:
            try:
                fleet.put_deployment(registry.deployment_decoder.decode(value))
            except msgspec.DecodeError as exc:
                log.warning("bad deployment record %s: %s", key, exc)

        def on_delete(key: str) -> None:
            fleet.delete_deployment(key.partition(".")[2])

        async def on_lease(active: bool) -> None:
            if active:
                self.wake.set()  # finish or undo a predecessor's removals at once
            else:
                await self.autoscaler.stand_down()

        self.lease.on_change.append(on_lease)
        try:
            await self.bucket.get()  # made now, so `nats kv ls` shows it; the lease loop retries on failure
        except Exception as exc:
            log.warning("cannot open the autoscaler's KV bucket %s yet (%s: %s); retrying", subjects.AUTOSCALER_BUCKET, type(exc).__name__, exc)
        self._subs.append(await self.nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_heartbeat))
        self._spawn("registry-watch", lambda: follow(
            self.nc.jetstream(), subjects.REGISTRY_BUCKET, subjects.DEPLOYMENT_KEYS, on_put=on_put,
            on_delete=on_delete, on_snapshot=self.synced.set, stopping=stopping,
        ), stopping)  # fmt: skip
        await self.lease.keep()  # the first round now: discovery says active or standby from the start
        self._spawn("lease", lambda: self.lease.run(stopping, self.settings.interval), stopping)

    def _spawn(self, name: str, loop: Any, stopping: asyncio.Event) -> None:
        self._tasks.append(asyncio.create_task(supervised(f"autoscaler {name}", loop, stopping), name=name))

    async def run(self, stopping: asyncio.Event) -> None:
        """Tick the policy while holding the lease, once the registry snapshot is in and the
        warm-up has passed."""
        warmed = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._warm_up(warmed), name="warm-up"))
        await supervised("autoscaler tick", lambda: self.autoscaler.run(stopping, self.settings.interval, ready=warmed, wake=self.wake), stopping)

    async def _warm_up(self, warmed: asyncio.Event) -> None:
        # Counted from the snapshot: the deployments must be known for nodes to count.
        await self.synced.wait()
        await self.clock.sleep(self.settings.warm_up_s())
        log.info("autoscaler: heard heartbeats for %gs; deciding from now on (while active)", self.settings.warm_up_s())
        warmed.set()
        self.wake.set()

    async def close(self) -> None:
        # The loops first: a lease round after the release below would take the lease again.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.autoscaler.close()  # while the lease is still valid (nodes draining go back)
        await self.lease.release()
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
    holder: str = "",
    lease_clock: Clock | None = None,
    audit: AuditLog | None = None,
) -> AutoscalerService:
    """The autoscaler with its adapters: by default, those `settings` name.

    `clock` drives the policy (a VirtualClock in tests); the lease always runs on
    `lease_clock` (wall time by default): it is about real processes that may die.
    With `audit`, every node started or stopped is an audit record, and node commands
    name this instance (`autoscaler:<holder>`) so the nodes' records do too.
    """
    clock = clock if clock is not None else WallClock()
    chosen = make_actuator(settings.actuator, nc, settings) if actuator is _FROM_SETTINGS else actuator
    measures = AutoscalerMetrics(metrics if metrics is not None else CollectorRegistry())
    js = nc.jetstream()
    bucket = _Bucket(js, settings.kv_replicas)
    lease = LeaseKeeper(bucket.get, holder or settings.instance_id or default_holder(), settings.lease_ttl_s(),
                        lease_clock if lease_clock is not None else WallClock(), measures)  # fmt: skip

    async def publish(data: bytes) -> None:
        await nc.publish(subjects.AUTOSCALER_DECISIONS, data)

    identity = f"autoscaler:{lease.holder}"
    scaler = Autoscaler(
        FleetView(forget_after=3 * settings.max_signal_age),
        AuditedActuator.wrap(chosen, audit, identity),
        control if control is not None else NatsNodeControl(nc, by=identity),
        publish,
        clock,
        settings.scaling(),
        measures,
        drain_timeout=settings.drain_timeout,
        start_timeout=settings.start_timeout,
        drain_poll=drain_poll,
        book=KvRemovalBook(js, bucket.get),
        gate=lease,
    )
    return AutoscalerService(nc=nc, settings=settings, autoscaler=scaler, clock=clock, lease=lease, bucket=bucket)
