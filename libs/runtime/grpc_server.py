"""A gRPC server with the standard health and reflection services already on it.

Every tierflow gRPC server needs both (health for load balancers and `tierflow up`,
reflection so grpcurl works without .proto files); this is the one place that wires them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tierflow.runtime.grpc_guard import MalformedRequestGuard

__all__ = ["start_grpc_server"]


async def start_grpc_server(
    add_servicers: Callable[[grpc.aio.Server], None], service_names: Sequence[str], host: str, port: int, *, max_calls: int = 0,
    credentials: grpc.ServerCredentials | None = None, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """Start serving `service_names` (full names, e.g. tierflow.v1.Inference) on host:port.

    `max_calls` bounds the calls served at once (0: no bound); one more is refused by
    gRPC itself with RESOURCE_EXHAUSTED before any of our code runs. With `credentials`
    (`tierflow.runtime.tls.grpc_server_credentials`) the port speaks TLS only: a
    plaintext client fails its handshake, and health and reflection are behind TLS too.
    `interceptors` run around every call (the registry's admin credential check is one),
    after `MalformedRequestGuard` (undecodable request bytes: INVALID_ARGUMENT, not INTERNAL)."""
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
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server
