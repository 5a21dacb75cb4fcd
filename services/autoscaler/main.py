"""The autoscaler service: SLO-driven replica counts per bundle deployment, carried out.

It follows the registry (deployments, their bounds and mode) and the nodes' heartbeats
(load, queue, batch, p95 TTFT/ITL), runs the pure state machine in tierflow.scaling
every `interval`, publishes every decision with its inputs and reason on NATS, and
carries changes out through the configured actuator (`--actuator local | kubernetes |
none`; `tierflow up` runs it with `local`). Scale-down is cordon -> drain -> stop.
"""

from __future__ import annotations

import logging

from tierflow.runtime import discovery
from tierflow.runtime.service import ServiceContext, connect_nats
from tierflow.services.autoscaler.bootstrap import bootstrap
from tierflow.services.autoscaler.settings import Settings

__all__ = ["Settings", "main"]

log = logging.getLogger(__name__)


async def main(ctx: ServiceContext, settings: Settings) -> None:
    nc = await connect_nats(settings.nats_url, "tierflow-autoscaler", stopping=ctx.stopping)
    service = bootstrap(nc, settings, metrics=ctx.metrics)
    await service.start(ctx.stopping)
    micro = await discovery.register(nc, "autoscaler", ctx.instance, actuator=service.autoscaler.actuator_name,
                                     mode="advisory" if service.autoscaler.actuator is None else "acting")  # fmt: skip
    log.info("autoscaler: actuator %s, tick every %gs", service.autoscaler.actuator_name, settings.interval)
    await service.run(ctx.stopping)
    await service.close()
    await micro.stop()
    await nc.drain()
