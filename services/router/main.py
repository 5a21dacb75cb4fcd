"""The router service: the fabric's front door (OpenAI HTTP + gRPC).

It keeps two caches fed from NATS — nodes from their heartbeats, models and
deployments from the registry's KV bucket — and routes each request over NATS to a
node chosen from them. The one state that must survive it, what each tenant used, is in
the usage ledger (JetStream): it writes a record per admitted request, and reads the
current quota windows back at start, before it opens its ports (usage_ledger.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
import msgspec
from nats.js.client import JetStreamContext

from tierflow.contracts import registry, subjects
from tierflow.runtime import discovery, nats_auth
from tierflow.runtime.waiting import first
from tierflow.runtime.clock import WallClock
from tierflow.runtime.grpc_server import health_follows, stop_grpc_server
from tierflow.runtime.kv import follow
from tierflow.runtime.usage_stream import ensure_usage_stream
from tierflow.runtime.service import ServiceContext, connect_nats
from tierflow.runtime.supervise import supervised
from tierflow.runtime.tls import grpc_server_credentials, server_ssl_context
from tierflow.placement import SessionTable, TenantDirectory
from tierflow.placement.admission import Admission, AdmissionConfig, capacity_of
from tierflow.placement.heartbeats import HeartbeatGate
from tierflow.services.router.agent_loop_events import AgentLoopEvents
from tierflow.services.router.config import load_router_config
from tierflow.services.router.dispatch import Dispatcher
from tierflow.services.router.grpc_api import start_grpc
from tierflow.services.router.http_server import serve, shutdown
from tierflow.services.router.metrics import AdmissionCollector, HttpServerCollector, PrefixIndexCollector, RouterMetrics
from tierflow.services.router.openai_api import OpenAIApi
from tierflow.services.router.peers import RouterPeers
from tierflow.services.router.prefix_feed import PrefixFeed
from tierflow.placement.prefix_index import PrefixIndex
from tierflow.services.router.settings import Settings
from tierflow.services.router.usage_ledger import QuotaCollector, UsageLedger, restore_usage
from tierflow.placement.tables import ModelTable, NodeTable
from tierflow.services.router.transport import NatsNodeTransport

__all__ = ["Settings", "main"]

log = logging.getLogger(__name__)



async def _until_ready(catalog_loaded: asyncio.Event, wait: float, stopping: asyncio.Event, usage_restored: asyncio.Event | None = None) -> None:
    """Hold the ports closed until the router knows the catalog (the registry watch's first
    snapshot) and its tenants' usage (the ledger read back), at most `wait` seconds: a
    restarted router sharing a port (--reuse-port) would otherwise answer its peers'
    clients "model does not exist" until the watch caught up. Nodes are not waited for:
    without one the answer is a retryable 503, which is true; nor, past `wait`, the ledger:
    until it is read, tenants with a quota get a 503 rather than a fresh quota."""
    async def both() -> None:
        await catalog_loaded.wait()
        if usage_restored is not None:
            await usage_restored.wait()

    await first(both(), stopping.wait(), timeout=wait)
    if not catalog_loaded.is_set() and not stopping.is_set():
        log.warning("router opens its ports without the registry's catalog after %.0fs: is the model registry up?", wait)
    if usage_restored is not None and not usage_restored.is_set() and not stopping.is_set():
        log.warning("router opens its ports before it read the usage ledger after %.0fs: tenants with a token quota are refused (503) "
                    "until it has", wait)  # fmt: skip


async def _restore_usage(js: JetStreamContext, tenants: TenantDirectory, router_id: str, clock: WallClock, started_at: float,
                         max_age: float, replicas: int, restored: asyncio.Event, stopping: asyncio.Event) -> None:
    """Make the usage stream (idempotent) and rebuild the quotas from it, retrying until it
    works or the router stops (a JetStream outage at start must not hand out fresh quotas)."""
    delay = 0.2
    while not stopping.is_set():
        try:
            await ensure_usage_stream(js, max_age=max_age, replicas=replicas)
            read = await restore_usage(js, tenants, router_id, clock, started_at)
        except Exception as exc:  # nats-py raises several unrelated types
            log.warning("reading the usage ledger failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
            await first(stopping.wait(), timeout=delay)
            delay = min(5.0, delay * 2)
            continue
        restored.set()
        log.info("usage restored from the ledger: %d records read", read, extra={"fields": {"usage_records_read": read}})
        return


async def main(ctx: ServiceContext, settings: Settings) -> None:
    # With NATS credentials the id is theirs (they allow only that router's subjects).
    router_id = subjects.check_token(nats_auth.own_id(nats_auth.ROUTER, settings.router_id) or f"r{uuid.uuid4().hex[:12]}", "router id")
    nc = await connect_nats(settings.nats_url, f"tierflow-router-{router_id}", stopping=ctx.stopping, tls=ctx.tls)
    clock = WallClock()
    started_at = clock.now()  # the ledger's records of this router admitted later are this process's own
    # Which node holds which prompt blocks, exactly, from the nodes' KV events (issue 17):
    # placement reads it through the node table, the heartbeats' recent hashes otherwise.
    prefix_index = PrefixIndex()
    nodes = NodeTable(prefix_sets=prefix_index.holder)
    models = ModelTable()
    # A bad configuration file stops the router here, with the problem named.
    config = load_router_config(
        settings.config, policy_override=settings.placement_policy, switch_cost=models.switch_cost, batch_turn=models.batch_turn,
        prefill_rate=models.prefill_rate, allow_anonymous=settings.allow_anonymous,
    )
    metrics = RouterMetrics(ctx.metrics)
    # Usage: quotas admit nothing until the ledger was read back (restore-usage below).
    config.tenants.expect_restore()
    usage_restored = asyncio.Event()
    ledger = UsageLedger(nc.jetstream(), router_id, clock, registry=ctx.metrics, capacity=settings.usage_buffer, ack_wait=settings.usage_ack_wait)
    ctx.metrics.register(QuotaCollector(config.tenants, clock, usage_restored))

    # Heartbeats are checked against bounds, their subject and the registry before they
    # place anything (tierflow.placement.heartbeats); the rejected are counted and logged.
    heartbeats = HeartbeatGate(clock, deployment=models.deployment, on_reject=lambda reason: metrics.heartbeats_rejected.labels(reason).inc())

    async def on_heartbeat(msg: object) -> None:
        hb = heartbeats.admit(msg.subject, msg.data)  # type: ignore[attr-defined]
        if hb is None:
            return
        try:
            nodes.apply(hb, clock.monotonic(), workload=models.workload(hb.deployment))
        except Exception:  # never let one heartbeat end the subscription's callbacks
            log.exception("applying the heartbeat of %s failed", hb.node_id)
        await prefix_feed.heard(hb.node_id)

    def on_put(key: str, value: bytes, revision: int) -> None:
        try:
            if key.startswith("model."):
                models.put_model(registry.model_decoder.decode(value))
            elif key.startswith("deployment."):
                models.put_deployment(registry.deployment_decoder.decode(value))
        except msgspec.DecodeError as exc:
            log.warning("bad registry record %s: %s", key, exc)

    def on_delete(key: str) -> None:
        kind, _, name = key.partition(".")
        if kind == "model":
            models.delete_model(name)
        elif kind == "deployment":
            models.delete_deployment(name)

    transport = NatsNodeTransport(nc, router_id, liveness_timeout=settings.liveness_timeout)
    await transport.start()
    prefix_feed = PrefixFeed(nc, router_id, clock, prefix_index)
    await prefix_feed.start()
    ctx.metrics.register(PrefixIndexCollector(prefix_feed))
    await nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_heartbeat)
    sessions = SessionTable(settings.session_capacity)
    peers = RouterPeers(nc, router_id, clock, sessions=sessions, nodes=nodes, interval=settings.presence_interval)
    await peers.start()

    admission = Admission(AdmissionConfig(
        queue_budget_s=settings.queue_budget, max_queue_factor=settings.max_queue_factor,
        headroom=settings.admission_headroom, idle_grace_s=settings.admission_idle_grace,
    )) if settings.queue_budget else None  # fmt: skip
    if admission is not None:
        ctx.metrics.register(AdmissionCollector(admission))

    async def housekeeping() -> None:
        while not ctx.stopping.is_set():
            now = clock.monotonic()
            nodes.forget_dead(now)
            prefix_feed.housekeeping(now)
            metrics.nodes.set(len(nodes.live(now)))
            if admission is not None:
                admission.set_capacities(capacity_of(nodes.views, now))
            await first(ctx.stopping.wait(), timeout=0.5)

    async def count_peers() -> None:
        """Split the tenants' limits over the routers heard on NATS (their presence)."""
        counted = 1
        metrics.peers.set(counted)
        while not ctx.stopping.is_set():
            routers = peers.count()
            if routers != counted:
                config.tenants.share(routers)
                if admission is not None:
                    admission.share(routers)
                log.info("%d routers: each admits 1/%d of every tenant's rate limit and quota", routers, routers)
            counted = routers
            metrics.peers.set(counted)
            await first(ctx.stopping.wait(), timeout=settings.peer_interval)

    catalog_loaded = asyncio.Event()
    loops = {
        "registry-watch": lambda: follow(
            nc.jetstream(), subjects.REGISTRY_BUCKET, ">", on_put=on_put, on_delete=on_delete, on_snapshot=catalog_loaded.set, stopping=ctx.stopping
        ),
        "housekeeping": housekeeping,
        "peers": lambda: peers.run(ctx.stopping),
    }
    if settings.peer_interval:
        loops["count-peers"] = count_peers
    tasks = [asyncio.create_task(supervised(f"router {name}", loop, ctx.stopping), name=name) for name, loop in loops.items()]
    agent_loop_events = AgentLoopEvents(nc, router_id)  # sessions flagged or capped, onto NATS
    # Once, then done (it retries its own failures): not a loop for `supervised`.
    tasks.append(asyncio.create_task(_restore_usage(nc.jetstream(), config.tenants, router_id, clock, started_at, settings.usage_max_age,
                                                    settings.usage_replicas, usage_restored, ctx.stopping), name="restore-usage"))  # fmt: skip
    # Not among `tasks`: never cancelled (a batch in flight would be lost); it ends once stopping is set.
    ledger_task = asyncio.create_task(ledger.run(ctx.stopping), name="usage-ledger")
    dispatcher = Dispatcher(
        nodes, models, transport, clock, metrics,
        policy=config.policy, tenants=config.tenants, sessions=sessions,
        max_attempts=settings.max_attempts, max_migrations=settings.max_migrations, resume_wait=settings.resume_wait,
        default_timeout=settings.request_timeout,
        on_session=peers.note_session, on_suspect=peers.note_suspect, admission=admission, on_usage=ledger.note,
        on_agent_loop=agent_loop_events.note,
    )
    api = OpenAIApi(dispatcher, models, nodes, clock, metrics, ctx.metrics, nats_connected=lambda: nc.is_connected)
    await _until_ready(catalog_loaded, settings.ready_wait, ctx.stopping, usage_restored)
    # With --tls-cert/--tls-key both front doors speak TLS only (clients bring no certificate:
    # tenants are told apart by their API keys).
    tls = ctx.tls.can_serve
    scheme = "https" if tls else "http"
    http = await serve(
        api.handle, settings.http_host, settings.http_port, reuse_port=settings.reuse_port,
        max_connections=settings.max_connections, header_timeout=settings.header_timeout,
        max_connections_per_client=settings.max_connections_per_client, body_timeout=settings.body_timeout,
        min_body_rate=settings.min_body_rate, authorize=api.authorize,
        ssl=server_ssl_context(ctx.tls) if tls else None,
    )  # fmt: skip
    ctx.metrics.register(HttpServerCollector(http))
    grpc_server = await start_grpc(dispatcher, clock, metrics, settings.grpc_host, settings.grpc_port, max_calls=settings.max_grpc_calls,
                                   credentials=grpc_server_credentials(ctx.tls) if tls else None, serving=False)  # fmt: skip

    def grpc_health() -> Awaitable[None]:  # SERVING while NATS is connected and a node is live, as /health
        return health_follows(grpc_server, lambda: nc.is_connected and bool(nodes.live(clock.monotonic())), ctx.stopping,
                              what="NATS disconnected or no live node")  # fmt: skip

    tasks.append(asyncio.create_task(supervised("router grpc-health", grpc_health, ctx.stopping), name="grpc-health"))
    micro = await discovery.register(
        nc, "router", router_id,
        http=f"{scheme}://{settings.http_host}:{settings.http_port}", grpc=f"{settings.grpc_host}:{settings.grpc_port}",
    )
    log.info("router %s: OpenAI on %s://%s:%d/v1, gRPC on %s:%d%s", router_id, scheme, settings.http_host, settings.http_port, settings.grpc_host,
             settings.grpc_port, " (TLS)" if tls else "", extra={"fields": {"router_id": router_id, "tls": tls}})  # fmt: skip
    await ctx.stopping.wait()

    await asyncio.gather(shutdown(http, settings.drain_grace), stop_grpc_server(grpc_server, settings.drain_grace))
    await ledger_task
    await ledger.close()  # every usage record of the requests just drained, stored before NATS goes
    await peers.close()
    await agent_loop_events.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await micro.stop()
    await nc.drain()
