"""The autoscaler service: SLO-driven replica counts per bundle deployment, carried out.

It follows the registry (deployments, their bounds and mode) and the nodes' heartbeats
(load, queue, batch, p95 TTFT/ITL), runs the pure state machine in tierflow.scaling
every `interval`, publishes every decision with its inputs and reason on NATS, and
carries changes out through the configured actuator (`--actuator local | kubernetes |
none`; `tierflow up` runs it with `local`). Scale-down is record -> cordon -> drain ->
stop, recorded in JetStream KV so a successor finishes or undoes it.

Several instances may run: one holds the lease and acts, the others stand by (they
listen, so they are warm when they take over) and publish nothing. Service discovery
says which (`mode`: active or standby), re-announced at every change.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.micro.service import Service

from tierflow.runtime import discovery
from tierflow.runtime.audit import AuditLog
from tierflow.runtime.clock import WallClock
from tierflow.runtime.service import ServiceContext, connect_nats
from tierflow.runtime.supervise import supervised
from tierflow.runtime.waiting import first
from tierflow.services.autoscaler.bootstrap import AutoscalerService, bootstrap, default_holder
from tierflow.services.autoscaler.settings import Settings

__all__ = ["Settings", "main"]

log = logging.getLogger(__name__)


async def _announce(nc: NATS, instance: str, service: AutoscalerService, changed: asyncio.Event, stopping: asyncio.Event) -> None:
    """Keep this instance registered for discovery with its current mode (a nats.micro
    service's metadata is fixed, so a change of mode is a new registration)."""
    micro: Service | None = None
    registered = ""
    try:
        while not stopping.is_set():
            mode = "active" if service.lease.active else "standby"
            if mode != registered:
                if micro is not None:
                    await micro.stop()
                    micro = None
                micro = await discovery.register(nc, "autoscaler", instance, actuator=service.autoscaler.actuator_name,
                                                 mode=mode, holder=service.lease.holder)  # fmt: skip
                registered = mode
            changed.clear()
            await first(changed.wait(), stopping.wait())
    finally:
        if micro is not None:
            await micro.stop()


async def main(ctx: ServiceContext, settings: Settings) -> None:
    nc = await connect_nats(settings.nats_url, "tierflow-autoscaler", stopping=ctx.stopping, tls=ctx.tls)
    audit = AuditLog(nc, WallClock(), source=f"autoscaler/{ctx.instance}", metrics=ctx.metrics)
    service = bootstrap(nc, settings, metrics=ctx.metrics, holder=settings.instance_id or default_holder(ctx.instance), audit=audit)
    changed = asyncio.Event()

    async def on_lease(active: bool) -> None:
        changed.set()

    service.lease.on_change.append(on_lease)
    await service.start(ctx.stopping)
    announcer = asyncio.create_task(supervised("autoscaler discovery", lambda: _announce(nc, ctx.instance, service, changed, ctx.stopping), ctx.stopping))
    log.info("autoscaler %s: actuator %s, tick every %gs, lease ttl %gs (%s)", service.lease.holder, service.autoscaler.actuator_name,
             settings.interval, settings.lease_ttl_s(), "active" if service.lease.active else "standby")  # fmt: skip
    await service.run(ctx.stopping)
    await service.close()
    await audit.flush(timeout=2.0)
    changed.set()
    await announcer
    await nc.drain()
