"""The service kit: how every tierflow process starts, connects and stops.

A service is an `async def main(ctx: ServiceContext)` that sets itself up, awaits
`ctx.stopping.wait()`, and tears down. `run_service` owns the rest: JSON logging,
uvloop, SIGTERM/SIGINT -> graceful stop, a NATS connection that reconnects forever,
Prometheus on `metrics_port` and the tracer (from the `OTEL_*` environment). Nothing here runs at import.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

from tierflow.runtime import nats_auth
from tierflow.runtime.logs import configure_logging
from tierflow.runtime.looplag import watch_loop_lag
from tierflow.runtime.tls import TlsFiles, client_ssl_context
from tierflow.runtime.tracing import TracingConfigError, configure_tracing

__all__ = ["ServiceContext", "run_service", "connect_nats", "nats_servers", "server_round_trip"]

log = logging.getLogger(__name__)


def _service_registry() -> CollectorRegistry:
    """A metrics registry per service, not prometheus-client's global one: two services
    in one process (tests, the simulator) must not collide on metric names."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass
class ServiceContext:
    service: str
    instance: str
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: CollectorRegistry = field(default_factory=_service_registry)
    # --tls-cert/--tls-key/--tls-ca, common to every service (tierflow.cli.services): the
    # certificate its servers present, and the CA its clients (NATS, gRPC) verify against.
    tls: TlsFiles = field(default_factory=TlsFiles)


def nats_servers(url: str) -> list[str]:
    """The server list a `--nats-url` names: one URL, or several separated by commas (the
    members of a cluster, so the first connection succeeds while any one of them is up;
    afterwards the servers themselves tell clients about the others)."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


async def server_round_trip(nc: NATS, timeout: float = 0.5) -> bool:
    """True once the server has answered a round trip (so it has also processed everything
    this client published before); False when it does not answer within `timeout`.

    What `nc.flush(timeout)` is for, without its trap: nats-py 2.16 leaves a timed-out
    flush's future in its PONG queue, and the server's next PONG then kills the client's
    read loop while it still says it is connected (the connection goes deaf until its
    pings time out, 15-20 s; nats-io/nats.py#914). A request to a subject nobody serves
    makes the server answer "no responders", and a timed-out request cleans up after itself.
    """
    try:
        await nc.request(nc.new_inbox(), b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        return True
    except Exception:  # timeout, or the connection is going: nats-py raises several types
        return False
    return True  # somebody answered: the server is there all the same


async def connect_nats(
    url: str, name: str, *, stopping: asyncio.Event | None = None, connect_timeout: float = 30.0, tls: TlsFiles | None = None
) -> NATS:
    """Connect, retrying the first connection too (services may start before NATS is ready).

    After the first success nats-py reconnects on its own, forever, buffering publishes
    meanwhile; we only log the transitions. With `tls` set the server is verified against
    its CA (and shown the service's certificate, for a server that checks clients').
    """
    tls_options = {"tls": client_ssl_context(tls)} if tls is not None and tls.enabled else {}
    # This process's NATS identity (nats_auth): the credentials file TIERFLOW_NATS_CREDS names.
    try:
        creds = nats_auth.identity_from_env()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"cannot read the NATS credentials in ${nats_auth.CREDS_ENV}: {exc}") from exc
    auth_options = nats_auth.connect_options(creds)
    who = f" as {creds.identity.name}" if creds is not None else ""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected from %s", url)

    async def on_reconnect() -> None:
        log.info("nats reconnected to %s", url)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    delay = 0.1
    while True:
        try:
            return await nats.connect(
                nats_servers(url),
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                connect_timeout=2,
                # A server that stops answering (paused, partitioned) is found stale after
                # about 2 x 2 s, and the client moves to another member of the cluster.
                ping_interval=2,
                max_outstanding_pings=2,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **tls_options,
                **auth_options,
            )
        except Exception as exc:  # nats-py raises several unrelated types here
            if (stopping is not None and stopping.is_set()) or loop.time() > deadline:
                if "authorization" in str(exc).lower():
                    raise ConnectionError(f"NATS at {url} refused this process{who or ' (no credentials: set $' + nats_auth.CREDS_ENV + ')'}: {exc}") from exc
                raise ConnectionError(f"cannot reach NATS at {url}: {exc}; is nats-server running?") from exc
            log.info("waiting for NATS at %s%s (%s)", url, who, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _start_metrics(host: str, port: int, registry: CollectorRegistry) -> None:
    if port > 0:
        start_http_server(port, addr=host, registry=registry)
        log.info("metrics on http://%s:%d/metrics", host, port)


def run_service(
    service: str,
    main: Callable[[ServiceContext], Awaitable[None]],
    *,
    instance: str = "",
    log_level: str = "info",
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    tls: TlsFiles | None = None,
) -> None:
    """Run one service to completion under uvloop; exit cleanly on SIGTERM/SIGINT.

    `tls` reaches the service as `ctx.tls`; /metrics stays plain HTTP (bind it to
    loopback or a scrape-only network: it carries counts, never prompts)."""
    configure_logging(service, log_level)
    try:
        configure_tracing(service)  # from the standard OTEL_* environment (runtime/tracing.py)
    except TracingConfigError as exc:
        raise SystemExit(f"tierflow {service}: tracing: {exc}") from None

    async def _wrapped() -> None:
        ctx = ServiceContext(service=service, instance=instance or socket.gethostname(), tls=tls or TlsFiles())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, ctx.stopping.set)
        _start_metrics(metrics_host, metrics_port, ctx.metrics)
        lag = asyncio.create_task(watch_loop_lag(ctx.metrics, ctx.stopping), name="loop-lag")
        log.info("starting %s %s", service, ctx.instance)
        try:
            await main(ctx)
        finally:
            lag.cancel()
        log.info("stopped %s %s", service, ctx.instance)

    try:
        import uvloop

        uvloop.run(_wrapped())
    except ImportError:  # uvloop is a dependency; this only keeps odd platforms working
        asyncio.run(_wrapped())
