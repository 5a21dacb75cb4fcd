"""A gRPC server with the standard health and reflection services already on it.

Every tierflow gRPC server needs both (health for load balancers and `tierflow up`,
reflection so grpcurl works without .proto files); this is the one place that wires them.

Health follows the service's readiness, not merely the port: a server started with
`serving=False` answers NOT_SERVING until its owner calls `set_serving(server, True)`
(the router does once NATS is connected and a node is live, and back when either is
lost), and `stop_grpc_server` turns every service NOT_SERVING before the grace period,
so a balancer stops sending new calls while the running ones finish.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tierflow.runtime.grpc_guard import MalformedRequestGuard

__all__ = ["health_follows", "set_serving", "start_grpc_server", "stop_grpc_server"]

log = logging.getLogger(__name__)

# Each server's health servicer and the names it reports ("" is the server as a whole).
_health: weakref.WeakKeyDictionary[grpc.aio.Server, tuple[health.aio.HealthServicer, tuple[str, ...]]] = weakref.WeakKeyDictionary()


async def start_grpc_server(
    add_servicers: Callable[[grpc.aio.Server], None], service_names: Sequence[str], host: str, port: int, *, max_calls: int = 0,
    credentials: grpc.ServerCredentials | None = None, interceptors: Sequence[grpc.aio.ServerInterceptor] = (), serving: bool = True,
) -> grpc.aio.Server:
    """Start serving `service_names` (full names, e.g. tierflow.v1.Inference) on host:port.

    `max_calls` bounds the calls served at once (0: no bound); one more is refused by
    gRPC itself with RESOURCE_EXHAUSTED before any of our code runs. With `credentials`
    (`tierflow.runtime.tls.grpc_server_credentials`) the port speaks TLS only: a
    plaintext client fails its handshake, and health and reflection are behind TLS too.
    `interceptors` run around every call (the registry's admin credential check is one),
    after `MalformedRequestGuard` (undecodable request bytes: INVALID_ARGUMENT, not INTERNAL).
    `serving`: the health status it starts with (see the module docstring)."""
    server = grpc.aio.server(maximum_concurrent_rpcs=max_calls or None, interceptors=[MalformedRequestGuard(), *interceptors])
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        address = f"{host}:{port}"
        bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpcio >= 1.6x raises where it used to return 0
        raise OSError(f"cannot listen for gRPC on {host}:{port}: the port is in use ({exc})") from None
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}: the port is in use")
    await server.start()
    names = ("", *service_names)
    _health[server] = (health_servicer, names)
    await set_serving(server, serving)
    return server


async def set_serving(server: grpc.aio.Server, serving: bool) -> None:
    """Report every service of `server` SERVING or NOT_SERVING (watchers hear the change)."""
    health_servicer, names = _health[server]
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in names:
        await health_servicer.set(name, status)


async def health_follows(server: grpc.aio.Server, ready: Callable[[], bool], stopping: asyncio.Event, *, what: str, interval: float = 0.25) -> None:
    """Keep `server`'s health equal to `ready()` (checked every `interval` s) until
    `stopping`: load balancers and `grpc_health_probe` see what /health says, not SERVING
    forever. `what` names the condition in the log line each change writes."""
    serving: bool | None = None  # unknown: the first turn always says
    while not stopping.is_set():
        now_ready = bool(ready())
        if now_ready != serving:
            await set_serving(server, now_ready)
            serving = now_ready
            log.info("gRPC health: %s", "SERVING" if now_ready else f"NOT_SERVING ({what})")
        try:
            await asyncio.wait_for(stopping.wait(), interval)
        except TimeoutError:
            pass


async def stop_grpc_server(server: grpc.aio.Server, grace: float | None) -> None:
    """NOT_SERVING for good (later `set_serving` calls are ignored), then stop after `grace`."""
    entry = _health.get(server)
    if entry is not None:
        await entry[0].enter_graceful_shutdown()
    await server.stop(grace=grace)
