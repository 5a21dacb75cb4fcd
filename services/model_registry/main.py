"""The model-registry service: owns models, versions, bundles, deployments and traffic.

`bootstrap` wires the pieces (KV store, event publisher, clock, metrics) into a
`RegistryService`; `main` applies the fleet file it was given (idempotent: unchanged
records are not rewritten, so a restart announces nothing), then serves the gRPC admin
API. State lives in JetStream KV, never here: the process can be killed and restarted
at will, even halfway through an apply (an apply is one atomic batch).

The bucket is kept as the registry needs it at every start: atomic batch writes allowed
and `kv_replicas` copies on a cluster (an older bucket is upgraded in place). Until NATS
answers, start-up waits (logged once); once serving, an outage makes admin calls answer
UNAVAILABLE, and the process lives on until NATS is back. It runs no loops of its own:
gRPC and the discovery endpoint are served by their libraries, and every NATS call is
made on behalf of one admin call.

It also owns the audit stream (`subjects.AUDIT_STREAM`): made, or given the configured
retention, at every start, before the admin API serves; its own records are the admin
calls (`grpc_api`), nodes and the autoscaler publish theirs into the same stream. Who
may make admin calls is `admin_auth`'s (a bad credential setting stops the start).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from tierflow.contracts import registry, subjects
from tierflow.rdu import load_catalog, load_profiles
from tierflow.runtime import discovery
from tierflow.runtime.clock import Clock, WallClock
from tierflow.nodehost.profiles import read_profiles_file
from tierflow.runtime.audit import AuditLog, ensure_audit_stream
from tierflow.runtime.kv import open_bucket
from tierflow.runtime.grpc_server import health_follows, stop_grpc_server
from tierflow.runtime.service import ServiceContext, connect_nats, server_round_trip
from tierflow.runtime.supervise import Backoff
from tierflow.runtime.tls import grpc_server_credentials
from tierflow.runtime.waiting import first
from tierflow.services.model_registry.admin_auth import AdminAuth
from tierflow.services.model_registry.errors import Aborted, Unavailable
from tierflow.services.model_registry.fleet import read_fleet_file
from tierflow.services.model_registry.grpc_api import start_grpc
from tierflow.services.model_registry.metrics import RegistryMetrics
from tierflow.services.model_registry.plan import summary
from tierflow.services.model_registry.rules import RuleContext
from tierflow.services.model_registry.service import RegistryService
from tierflow.services.model_registry.settings import Settings
from tierflow.services.model_registry.store import RegistryStore

__all__ = ["Settings", "main", "bootstrap", "rule_context"]

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode


async def bootstrap(
    nc: NATS, metrics: RegistryMetrics, *, clock: Clock | None = None, rules: RuleContext | None = None, attempts: int = 10,
    kv_replicas: int = 1, stopping: asyncio.Event | None = None,
) -> RegistryService:
    """The registry over `nc`'s JetStream: bucket made if missing (and allowed atomic
    batches), events on REGISTRY_EVENTS. Waits for JetStream while it cannot answer."""
    js = nc.jetstream()
    kv = await _until_ready(
        lambda: open_bucket(js, subjects.REGISTRY_BUCKET, create=True, replicas=kv_replicas, atomic=True),
        f"open bucket {subjects.REGISTRY_BUCKET}", stopping,
    )  # fmt: skip
    store = RegistryStore(js, kv, subjects.REGISTRY_BUCKET)

    async def publish(event: registry.RegistryEvent) -> None:
        # Flushed, so the event is on the server before the admin call that made it returns;
        # while NATS reconnects it waits in the client's buffer instead (a flush would
        # hold the call for its whole timeout, once per change).
        await nc.publish(subjects.REGISTRY_EVENTS, _encode(event))
        if nc.is_connected:
            await server_round_trip(nc, timeout=2)

    return RegistryService(store, publish, clock or WallClock(), metrics, rules=rules, attempts=attempts)


T = TypeVar("T")


async def _until_ready(step: Callable[[], Awaitable[T]], what: str, stopping: asyncio.Event | None) -> T:
    """`step()`, retried with a backoff while NATS cannot do it (logged once, then when
    it works); errors that are not outages (a bad fleet file, a bug) are raised."""
    backoff = Backoff(0.1, 2.0)
    failures = 0
    while True:
        try:
            result = await step()
        except (Unavailable, Aborted, nats.errors.Error, TimeoutError, OSError) as exc:
            if isinstance(exc, nats.js.errors.APIError) and exc.code not in (None, 503):
                raise
            if stopping is not None and stopping.is_set():
                raise
            failures += 1
            if failures == 1:
                log.warning("cannot %s yet (%s); retrying until NATS answers", what, exc, extra={"fields": {"step": what, "error": str(exc)}})
            await (first(stopping.wait(), timeout=backoff.next()) if stopping is not None else asyncio.sleep(backoff.next()))
            continue
        if failures:
            log.info("%s: done after %d failed attempts", what, failures)
        return result


def rule_context(profiles_file: str) -> RuleContext:
    """What fleets are checked against: the emulator's catalog, and the built-in hardware
    profiles plus those of `profiles_file` (YAML: name -> HardwareProfile fields)."""
    return RuleContext(catalog=load_catalog(None), profiles=load_profiles(read_profiles_file(profiles_file)))


def admin_auth(settings: Settings) -> AdminAuth:
    """The admin credential check the settings ask for (ValueError naming a bad flag)."""
    return AdminAuth.from_settings(
        token=settings.admin_token, token_file=settings.admin_token_file, token_hash=settings.admin_token_hash,
        cert_names=settings.admin_cert_names, protect_reads=settings.protect_reads, allow_unauthenticated=settings.allow_unauthenticated_admin,
    )  # fmt: skip


async def main(ctx: ServiceContext, settings: Settings) -> None:
    auth = admin_auth(settings)  # before anything connects: a bad token setting is the operator's to fix
    nc = await connect_nats(settings.nats_url, "tierflow-model-registry", stopping=ctx.stopping, tls=ctx.tls)
    clock = WallClock()
    metrics = RegistryMetrics(ctx.metrics)
    try:
        service = await bootstrap(
            nc, metrics, clock=clock, rules=rule_context(settings.profiles), attempts=settings.write_attempts,
            kv_replicas=settings.kv_replicas, stopping=ctx.stopping,
        )  # fmt: skip
        js = nc.jetstream()
        await _until_ready(
            lambda: ensure_audit_stream(js, max_age=settings.audit_max_age, max_msgs=settings.audit_max_msgs, replicas=settings.kv_replicas),
            f"make audit stream {subjects.AUDIT_STREAM}", ctx.stopping,
        )  # fmt: skip
        if settings.fleet:
            # A bad file stops the service with every problem listed; an outage is waited out.
            text = read_fleet_file(settings.fleet)
            changes = await _until_ready(lambda: service.apply(text, source=settings.fleet), f"apply fleet {settings.fleet}", ctx.stopping)
            log.info("applied fleet %s", settings.fleet, extra={"fields": {"fleet": settings.fleet, **summary(changes)}})
    except BaseException:
        await nc.close()
        raise
    # --tls-cert/--tls-key: the admin API speaks TLS only (who may call it is the admin
    # credential's business, not the transport's).
    credentials = grpc_server_credentials(ctx.tls) if ctx.tls.can_serve else None
    audit = AuditLog(nc, clock, source=f"model-registry/{ctx.instance}", metrics=ctx.metrics)
    server = await start_grpc(service, clock, metrics, settings.grpc_host, settings.grpc_port, auth=auth, audit=audit, credentials=credentials)
    micro = await discovery.register(nc, "model-registry", ctx.instance, grpc=f"{settings.grpc_host}:{settings.grpc_port}")
    log.info("model registry serving gRPC on %s:%d%s", settings.grpc_host, settings.grpc_port, " (TLS)" if credentials else "")
    # Health follows the NATS link: without it no admin call can be stored.
    await health_follows(server, lambda: nc.is_connected, ctx.stopping, what="NATS disconnected")
    await stop_grpc_server(server, grace=2.0)  # NOT_SERVING first: balancers stop sending
    await audit.flush(timeout=2.0)
    for step in (micro.stop, nc.drain):  # NATS may be down at exit: stop anyway
        try:
            await asyncio.wait_for(step(), 5.0)
        except Exception as exc:
            log.warning("model registry shutdown: %s failed (%s)", getattr(step, "__name__", step), exc)
