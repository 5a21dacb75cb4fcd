"""The autoscaler service: watches node load and publishes a decision per deployment.

It follows the registry (min/max replicas per deployment) and the nodes' heartbeats,
asks the pure policy in tierflow.scaling what each deployment needs, and publishes
every decision with its inputs on NATS. Actuation (starting and stopping nodes) plugs
in behind this; until an actuator is configured, decisions are advisory.
"""

from __future__ import annotations

import asyncio
import logging
import msgspec
from prometheus_client import Counter, Gauge

from tierflow.contracts import messages, registry, subjects
from tierflow.runtime import discovery
from tierflow.runtime.clock import WallClock
from tierflow.runtime.kv import follow
from tierflow.runtime.service import ServiceContext, connect_nats
from tierflow.scaling import DeploymentLoad, recommend_by_utilization
from tierflow.services.autoscaler.settings import Settings

__all__ = ["Settings", "main"]

log = logging.getLogger(__name__)



async def main(ctx: ServiceContext, settings: Settings) -> None:
    nc = await connect_nats(settings.nats_url, "tierflow-autoscaler", stopping=ctx.stopping)
    clock = WallClock()
    beats: dict[str, tuple[float, messages.NodeHeartbeat]] = {}
    deployments: dict[str, registry.DeploymentRecord] = {}
    decisions = Counter("tierflow_autoscaler_decisions", "Scaling decisions by direction", ("deployment", "direction"), registry=ctx.metrics)
    desired_gauge = Gauge("tierflow_autoscaler_desired_replicas", "Replicas the policy asks for", ("deployment",), registry=ctx.metrics)

    async def on_heartbeat(msg: object) -> None:
        try:
            hb = messages.heartbeat_decoder.decode(msg.data)  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            return
        beats[hb.node_id] = (clock.monotonic(), hb)

    def on_put(key: str, value: bytes, revision: int) -> None:
        record = registry.deployment_decoder.decode(value)
        deployments[record.name] = record

    def on_delete(key: str) -> None:
        deployments.pop(key.partition(".")[2], None)

    await nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_heartbeat)
    watch = asyncio.create_task(follow(nc.jetstream(), subjects.REGISTRY_BUCKET, subjects.DEPLOYMENT_KEYS, on_put=on_put, on_delete=on_delete, stopping=ctx.stopping))
    micro = await discovery.register(nc, "autoscaler", ctx.instance, mode="advisory")

    while not ctx.stopping.is_set():
        try:
            await asyncio.wait_for(ctx.stopping.wait(), timeout=settings.interval)
            break
        except asyncio.TimeoutError:
            pass
        now = clock.monotonic()
        for name, dep in deployments.items():
            live = [hb for seen, hb in beats.values() if hb.deployment == name and hb.role == "decode" and now - seen <= 3 * hb.interval_s]
            load = DeploymentLoad(
                deployment=name, replicas=len(live), running=sum(h.running for h in live), waiting=sum(h.queue_depth for h in live),
                batch_slots=sum(h.max_batch for h in live), min_replicas=dep.min_replicas, max_replicas=dep.max_replicas,
            )
            rec = recommend_by_utilization(load, settings.target_utilization)
            direction = "up" if rec.desired > rec.current else "down" if rec.desired < rec.current else "hold"
            decisions.labels(name, direction).inc()
            desired_gauge.labels(name).set(rec.desired)
            decision = messages.AutoscalerDecision(
                deployment=name, at=clock.now(), current_replicas=rec.current, desired_replicas=rec.desired, reason=rec.reason,
                inputs={"running": load.running, "waiting": load.waiting, "batch_slots": load.batch_slots, "utilization": round(rec.utilization, 4)},
            )
            await nc.publish(subjects.AUTOSCALER_DECISIONS, messages.encoder.encode(decision))

    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    await micro.stop()
    await nc.drain()
