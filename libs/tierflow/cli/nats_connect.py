"""One NATS connection for a short-lived CLI command (`tierflow status`, `tierflow top`).

Why not `runtime.service.connect_nats`: a service waits for NATS and reconnects forever;
a command run by a person should fail at once with a sentence saying what to do. The
`--nats-url` may name several servers (a cluster, comma separated): each is probed in
turn and the first that answers is tried first, the others staying in the server list.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS

from tierflow.cli.client_tls import cli_tls
from tierflow.runtime.service import nats_servers
from tierflow.runtime.tls import TlsError, client_ssl_context

__all__ = ["connect_once"]


async def _probe(server: str) -> str | None:
    """None when something accepts a TCP connection at the server's host and port, else why not."""
    url = urlsplit(server if "://" in server else f"nats://{server}")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 4222), 2.0)
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    except TimeoutError:
        return "no answer"
    writer.close()
    return None


async def connect_once(nats_url: str, *, name: str = "tierflow-cli") -> NATS:
    """Connect without retrying, or raise ConnectionError with a message a person can act on.

    The ports are probed first because nats-py keeps retrying a refused first connection.
    Under TLS (`tierflow.cli.client_tls`) the server is verified against the CA and shown
    the client certificate.
    """

    async def quiet(exc: Exception) -> None:  # the one clear message is raised below
        pass

    try:
        servers = nats_servers(nats_url)
    except ValueError as exc:
        raise ConnectionError(f"{exc}; pass --nats-url nats://HOST:PORT[,nats://HOST:PORT...]") from None
    problems = {server: await _probe(server) for server in servers}
    reachable = [server for server, problem in problems.items() if problem is None]
    fail = f"cannot reach NATS at {nats_url} ({{}}); is the fabric up? Start it with `make up`"
    if not reachable:
        raise ConnectionError(fail.format("; ".join(dict.fromkeys(p for p in problems.values() if p))))
    ordered = reachable + [s for s in servers if s not in reachable]
    tls = cli_tls()
    try:
        tls_options = {"tls": client_ssl_context(tls)} if tls is not None else {}
    except (TlsError, OSError) as exc:
        raise ConnectionError(f"cannot use the TLS files ({exc}); check --tls-ca/--tls-cert/--tls-key or TIERFLOW_TLS_*") from None
    try:
        return await asyncio.wait_for(
            nats.connect(ordered, name=name, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                         dont_randomize=True, error_cb=quiet, **tls_options),  # fmt: skip
            5.0,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no answer"
        raise ConnectionError(fail.format(reason)) from None
