"""One NATS connection for a short-lived CLI command (`tierflow status`, `tierflow top`).

Why not `runtime.service.connect_nats`: a service waits for NATS and reconnects forever;
a command run by a person should fail at once with a sentence saying what to do. The
`--nats-url` may name several servers (a cluster, comma separated): each is probed in
turn and the first that answers is tried first, the others staying in the server list.

NATS credentials (`tierflow.runtime.nats_auth`): `tierflow --nats-creds FILE <command>` or
$TIERFLOW_NATS_CREDS; else the admin identity of a `tierflow up` on the data dir
(DATA/auth/admin.creds, DATA = $TIERFLOW_DATA_DIR or .tierflow) when there is one; else
none (a fabric run with `--no-nats-auth`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS

from tierflow.cli.client_tls import DATA_DIR_ENV, DEFAULT_DATA_DIR, cli_tls
from tierflow.runtime import nats_auth
from tierflow.runtime.service import nats_servers
from tierflow.runtime.tls import TlsError, client_ssl_context

__all__ = ["cli_credentials", "connect_once"]


def cli_credentials() -> nats_auth.Credentials | None:
    """The identity the CLI connects as (see the module docstring); ConnectionError when a
    named file cannot be read. Read when a command connects, never at import."""
    chosen = os.environ.get(nats_auth.CREDS_ENV, "").strip()
    if not chosen:
        admin = Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR) / "auth" / "admin.creds"
        chosen = str(admin) if admin.is_file() else ""
    if not chosen:
        return None
    try:
        return nats_auth.read_creds(chosen)
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"cannot read NATS credentials {chosen}: {exc}") from None


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
    identity = cli_credentials()
    try:
        tls_options = {"tls": client_ssl_context(tls)} if tls is not None else {}
    except (TlsError, OSError) as exc:
        raise ConnectionError(f"cannot use the TLS files ({exc}); check --tls-ca/--tls-cert/--tls-key or TIERFLOW_TLS_*") from None
    try:
        return await asyncio.wait_for(
            nats.connect(ordered, name=name, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                         dont_randomize=True, error_cb=quiet, **tls_options, **nats_auth.connect_options(identity)),  # fmt: skip
            5.0,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        if "authorization" in str(exc).lower():
            who = f"the credentials of {identity.identity.name}" if identity is not None else "a connection without credentials"
            raise ConnectionError(
                f"NATS at {nats_url} refused {who} (authorization violation); pass `tierflow --nats-creds DATA/auth/admin.creds ...` "
                f"or set {nats_auth.CREDS_ENV} (tierflow up writes them under its --data-dir)"
            ) from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no answer"
        raise ConnectionError(fail.format(reason)) from None
