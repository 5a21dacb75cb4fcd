"""Everything a node process does, for either role (decode or prefill).

Requests arrive on the node's subject and go into the pure emulator; its tokens stream
back to the reply subject. On SIGTERM the node stops taking work, says so in its
heartbeat, lets in-flight requests finish for a grace period, and fails the rest as
retryable (the router retries those with no token yet and resumes the others elsewhere).

Every loop (engine, heartbeat, gauges, bundle watch, router liveness) runs supervised,
so a NATS outage cannot leave a node that heartbeats but never answers; the node hears
the routers' presence and drops the streams of a router that died.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from opentelemetry.trace import SpanKind

from tierflow.contracts import messages, subjects
from tierflow.nodehost.control import add_control_endpoint
from tierflow.nodehost.bundle import describe_bundle, fetch_bundle, watch_bundle
from tierflow.nodehost.profiles import resolve_profile
from tierflow.nodehost.driver import EngineDriver
from tierflow.nodehost.routers import RouterLiveness
from tierflow.nodehost.beat import NodeIdentity
from tierflow.nodehost.heartbeat import heartbeat_loop
from tierflow.nodehost.kv_events import KvEventFeed, kv_events_loop
from tierflow.nodehost.metrics import ModelMetrics, NodeMetrics
from tierflow.nodehost.settings import NodeSettings
from tierflow.nodehost.preload import preload_models
from tierflow.rdu import NodeEngine
from tierflow.runtime import discovery
from tierflow.runtime.audit import AuditLog
from tierflow.runtime.logs import log_record
from tierflow.runtime.clock import WallClock
from tierflow.runtime.service import ServiceContext, connect_nats
from tierflow.runtime.supervise import supervised
from tierflow.runtime.waiting import first
from tierflow.runtime.tracing import PROVIDER_NAME, exporting, extract_context, tracer

__all__ = ["NodeSettings", "serve_node"]


log = logging.getLogger(__name__)



async def serve_node(ctx: ServiceContext, settings: NodeSettings, *, role: str, subject: str, service: str) -> None:
    """Everything a node does, for either role; only the subject and role differ."""
    nc = await connect_nats(settings.nats_url, f"tierflow-{role}-{settings.node_id}", stopping=ctx.stopping, tls=ctx.tls)
    js = nc.jetstream()
    deployment, bundle = await fetch_bundle(js, settings.deployment, ctx.stopping)
    profile_name = settings.profile or deployment.profile
    clock = WallClock()
    profile = resolve_profile(profile_name, settings.profiles)
    engine = NodeEngine(
        profile, bundle, now=clock.monotonic(),
        preload=preload_models(profile, bundle, settings.node_id) if settings.preload == "hbm" else (),
        ddr_resident=[] if settings.preload == "cold" else None,
        kv_events=settings.kv_events_interval > 0,
        starvation_s=settings.starvation_s, preemption=not settings.no_preemption,
    )
    identity = NodeIdentity(
        node_id=settings.node_id, role=role, deployment=deployment.name,
        region=settings.region or deployment.region, residency=deployment.residency, profile=profile_name,
        started_at=time.time(),
    )
    metrics = NodeMetrics(ctx.metrics)
    per_model: dict[str, ModelMetrics] = {}
    spans = tracer("tierflow.node")

    def record(request_id: str, stream: object, finished: messages.Finished, at: float) -> None:
        s = stream  # a driver _Stream
        model = s.model  # type: ignore[attr-defined]
        m = per_model.get(model)
        if m is None:
            m = per_model[model] = ModelMetrics(metrics, settings.node_id, model)
        ttft = s.first_token_at - s.received_at if s.tokens else 0.0  # type: ignore[attr-defined]
        decode_time = at - s.first_token_at if s.tokens > 1 else 0.0  # type: ignore[attr-defined]
        m.queue_time.observe(s.queue_time)  # type: ignore[attr-defined]
        metrics.queued_for(settings.node_id, s.request_class, s.queue_time)  # type: ignore[attr-defined]
        if s.tokens:  # type: ignore[attr-defined]
            m.ttft.observe(ttft)
        m.prompt_tokens.inc(finished.prompt_tokens)
        m.generation_tokens.inc(finished.completion_tokens)
        m.prefix_cache_queries.inc(finished.prompt_tokens)
        m.prefix_cache_hits.inc(finished.cached_tokens)
        m.requests(finished.finish_reason).inc()
        started = s.received_at + s.queue_time  # type: ignore[attr-defined]
        m.served(s.queue_time, max(0.0, (s.first_token_at if s.tokens else at) - started), decode_time, finished.prompt_tokens, finished.cached_tokens)  # type: ignore[attr-defined]
        m.loads(s.tier or "hbm").inc()  # type: ignore[attr-defined]
        log_record(log, "served", {
            "request_id": request_id, "node": settings.node_id, "model": model,
            "decode_queue_time": round(s.queue_time, 6), "time_to_first_token": round(ttft, 6),  # type: ignore[attr-defined]
            "completion_tokens_per_sec": round((finished.completion_tokens - 1) / decode_time, 2) if decode_time > 0 else 0.0,
            "prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "cached_tokens": finished.cached_tokens, "tier": s.tier, "finish_reason": finished.finish_reason,  # type: ignore[attr-defined]
            "energy_j": round(finished.energy_j, 3), "request_class": s.request_class,  # type: ignore[attr-defined]
        })  # fmt: skip

    def dropped(request_id: str, model: str, reason: str) -> None:
        metrics.dropped.labels(settings.node_id, model, reason).inc()

    beat_now = asyncio.Event()
    routers = RouterLiveness(settings.router_abandon_after)
    driver = EngineDriver(
        engine, clock, nc.publish, settings.node_id,
        keepalive_interval=settings.keepalive_interval, on_finished=record, on_switch=beat_now.set,
        on_dropped=dropped, routers=routers,
        coalesce_window=settings.coalesce_window, coalesce_tokens=settings.coalesce_tokens,
    )

    async def on_presence(msg: object) -> None:
        try:
            presence = messages.presence_decoder.decode(msg.data)  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            return
        routers.heard(presence.router_id, clock.monotonic())

    async def watch_own_connection() -> None:
        """While this node was cut off from NATS it heard no router: start their silence over."""
        reconnects = nc.stats["reconnects"]
        while not engine_stop.is_set():
            await first(engine_stop.wait(), timeout=0.25)
            if nc.stats["reconnects"] != reconnects or not nc.is_connected:
                reconnects = nc.stats["reconnects"]
                routers.forgive(clock.monotonic())
            routers.forget_older_than(clock.monotonic(), 3600.0)

    async def on_generate(msg: object) -> None:
        reply = msg.reply  # type: ignore[attr-defined]
        if not reply:
            return
        try:
            request = messages.generate_decoder.decode(msg.data)  # type: ignore[attr-defined]
        except msgspec.DecodeError as exc:
            await nc.publish(reply, messages.encoder.encode(messages.Failed(request_id="", code="bad_request", message=f"undecodable generate request: {exc}")))
            return
        if identity.cordoned:  # sent before the router saw the cordon: let it go elsewhere
            await nc.publish(reply, messages.encoder.encode(messages.Failed(request_id=request.request_id, code="node_cordoned", message=f"node {settings.node_id} is cordoned", retryable=True)))
            return
        if not exporting():  # a span nobody sees: skip it and its context (issue 16)
            await driver.submit(request, reply)
            return
        # CONSUMER of the router's publish (its PRODUCER span is the parent); the driver ends
        # it with the request's stream, after the last token (or at its refusal or drop).
        span = spans.start_span("node.generate", context=extract_context(msg.headers), kind=SpanKind.CONSUMER, attributes={  # type: ignore[attr-defined]
            "messaging.system": "nats", "messaging.operation.type": "process", "messaging.destination.name": subject,
            "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": PROVIDER_NAME,
            "gen_ai.request.model": request.model, "gen_ai.response.id": request.request_id,
            "gen_ai.usage.input_tokens": len(request.prompt_token_ids) + len(request.resume_token_ids),
            "tierflow.node": settings.node_id, "tierflow.request_id": request.request_id,
            "tierflow.request_class": request.request_class,
        })
        await driver.submit(request, reply, span)

    kv_feed = KvEventFeed(settings.node_id, identity.started_at, snapshot_every=settings.kv_snapshot_every)

    async def on_kv_sync(msg: object) -> None:
        """A router missed some of this node's KV events: a snapshot goes out at the next poll."""
        kv_feed.request_snapshot()

    async def on_cancel(msg: object) -> None:
        try:
            driver.cancel(messages.cancel_decoder.decode(msg.data).request_id)  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            pass

    def update_gauges() -> None:
        snap = engine.snapshot(clock.monotonic())
        metrics.requests_running.labels(settings.node_id).set(snap.running)
        metrics.requests_waiting.labels(settings.node_id).set(snap.queue_depth)
        metrics.kv_cache_usage.labels(settings.node_id).set(snap.kv_usage)
        metrics.set_energy(settings.node_id, snap)
        metrics.set_queues(settings.node_id, snap)
        for m in snap.models:
            metrics.set_model_state(settings.node_id, m.name, m.in_flight, m.queued, snap.kv_usage)
            for tier in ("hbm", "ddr", "loading", "cold"):
                metrics.model_tier.labels(settings.node_id, m.name, tier).set(1.0 if m.tier == tier else 0.0)

    async def gauges_loop() -> None:
        while not engine_stop.is_set():
            update_gauges()
            await first(engine_stop.wait(), timeout=1.0)

    def on_outdated(outdated: bool, what: str) -> None:
        identity.bundle_outdated = outdated
        metrics.bundle_outdated.labels(settings.node_id).set(1.0 if outdated else 0.0)
        beat_now.set()
        if outdated:
            log.warning("the registry changed deployment %s's bundle (%s); this node keeps serving what it started with until it is restarted",
                        deployment.name, what, extra={"fields": {"change": what}})  # fmt: skip
        else:
            log.info("the registry's bundle for %s is again the one this node serves", deployment.name)

    metrics.bundle_outdated.labels(settings.node_id).set(0.0)
    gen_sub = await nc.subscribe(subject, cb=on_generate)
    cancel_sub = await nc.subscribe(subjects.node_cancel(settings.node_id), cb=on_cancel)
    presence_sub = await nc.subscribe(subjects.ROUTER_PRESENCE, cb=on_presence)
    kv_sync_sub = await nc.subscribe(subjects.node_kv_sync(settings.node_id), cb=on_kv_sync)
    micro = await discovery.register(nc, service, settings.node_id, deployment=deployment.name, region=identity.region, profile=profile_name)
    audit = AuditLog(nc, clock, source=f"{role}-node/{settings.node_id}", metrics=ctx.metrics)
    await add_control_endpoint(micro, identity, driver, beat_now, audit)
    engine_stop = asyncio.Event()
    loops = {
        "engine": lambda: driver.run(engine_stop),
        "heartbeat": lambda: heartbeat_loop(nc, identity, driver, clock, settings.heartbeat_interval, engine_stop, beat_now),
        "gauges": gauges_loop,
        "bundle-watch": lambda: watch_bundle(js, deployment, bundle, on_outdated, engine_stop),
        "connection-watch": watch_own_connection,
    }
    if settings.kv_events_interval > 0:
        loops["kv-events"] = lambda: kv_events_loop(nc, kv_feed, engine, clock, settings.kv_events_interval, engine_stop)
    tasks = [asyncio.create_task(supervised(f"node {name}", loop, engine_stop), name=name) for name, loop in loops.items()]
    served = describe_bundle(bundle)
    log.info("node %s serving %s on %s (%s)", settings.node_id, served, profile_name, role, extra={"fields": {"bundle": served}})
    await ctx.stopping.wait()

    # Drain: stop taking work, announce it, let in-flight requests finish, fail the rest.
    await gen_sub.unsubscribe()
    identity.cordoned = identity.draining = True
    beat_now.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.drain_grace
    while driver.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await driver.fail_all("node_shutdown", f"node {settings.node_id} is shutting down", retryable=True)
    engine_stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sub in (cancel_sub, presence_sub, kv_sync_sub):
        await sub.unsubscribe()
    await micro.stop()
    await nc.drain()


