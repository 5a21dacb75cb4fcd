"""`tierflow tls generate`: the CA and certificates `tierflow up --tls` makes, for a
deployment of your own (compose, Kubernetes Secrets) or another data dir.

The files are those of `tierflow.runtime.tls.ensure_local_pki`: made on the first run,
reused after (the CA always; the server certificate unless the hosts asked for are new or
it nears its end). Every service is then started with `--tls-cert server.pem --tls-key
server-key.pem --tls-ca ca.pem` and NATS with the same files (`tls { ... verify: true }`,
and in `cluster { tls { ... } }` for routes); clients get `ca.pem`, and `client.pem` +
`client-key.pem` where NATS asks for a certificate.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import typer

from tierflow.runtime.tls import default_hosts, ensure_local_pki

__all__ = ["app"]

app = typer.Typer(help="TLS files for the fabric: a local CA, the services' certificate and a client certificate.", no_args_is_help=True)


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for the files (made 0700; every file 0600).")],
    host: Annotated[list[str] | None, typer.Option("--host", help="A name or address the services are reached at (repeat); "
                                                   "127.0.0.1, ::1, localhost and this host's name are always in.")] = None,  # fmt: skip
) -> None:
    """Make (or reuse) the CA, a server certificate for the hosts and a client certificate."""
    try:
        pki = ensure_local_pki(out, hosts=default_hosts(*(host or [])), now=datetime.datetime.now(datetime.UTC))
    except OSError as exc:
        typer.echo(f"tierflow tls generate: cannot write under {out}: {exc}", err=True)
        raise typer.Exit(1) from None
    server, client = pki.server, pki.client
    typer.echo(f"CA                 {pki.ca}  (clients trust it; its key {out / 'ca-key.pem'} stays here)")
    typer.echo(f"services, NATS     --tls-cert {server.cert} --tls-key {server.key} --tls-ca {server.ca}")
    typer.echo(f"client certificate {client.cert} {client.key}  (the CLI, NATS clients)")
