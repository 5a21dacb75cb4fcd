"""`tierflow nats-auth generate`: the fabric's NATS identities as files, for deployments.

`tierflow up` makes its own under DATA/auth; compose and Kubernetes need the same files
made once and mounted (as Secrets): one credentials file per process and the server's
`authorization` block. Running the command again on the same directory keeps every
identity there and adds the ones missing (a new node id, a second router).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tierflow.cli.auth_files import AuthStore
from tierflow.runtime import nats_auth

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="NATS identities (nkeys) and the server's authorization block, for compose and Kubernetes.")  # fmt: skip


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for the files (made 0700; files 0600).")],
    router: Annotated[list[str] | None, typer.Option("--router", help="A router id (repeat): its identity router-<id>; the router takes its id from it.")] = None,
    node: Annotated[list[str] | None, typer.Option("--node", help="A node id (repeat): its identity node-<id>; the node must run with --node-id <id>.")] = None,
) -> None:
    """Write DIR/<identity>.creds for admin, observer, registry, autoscaler, supervisor, each
    router and each node, and DIR/nats-auth.conf (include it in every nats-server's config).
    Defaults: router r0; nodes prefill-0, decode-0, decode-1 (what deploy/docker-compose.yml runs)."""
    routers = router or ["r0"]
    nodes = node or ["prefill-0", "decode-0", "decode-1"]
    try:
        identities = nats_auth.fabric_identities(routers, nodes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    store = AuthStore(out)
    store.ensure(identities)
    for identity in identities:
        typer.echo(f"{store.creds_path(identity)}  ({identity.role})")
    typer.echo(f"{store.server_config}  (nats-server: include it; public keys and permissions only)")
