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

__all__ = ["app", "pool_node_ids"]

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="NATS identities (nkeys) and the server's authorization block, for compose and Kubernetes.")  # fmt: skip


def pool_node_ids(spec: str) -> list[str]:
    """`NAME=COUNT` -> NAME-0 .. NAME-<COUNT-1>: a StatefulSet's pod names, which are node ids
    where every pod's id is its pod name (deploy/k8s). Identities must exist before the pods
    do (no process may make them in the cluster), so one per replica the pool may reach."""
    name, sep, count = spec.partition("=")
    if not sep or not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--pool {spec!r}: expected NAME=COUNT with COUNT >= 1 (e.g. tierflow-default-decode=4)")
    return [f"{name}-{i}" for i in range(int(count))]


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for the files (made 0700; files 0600).")],
    router: Annotated[list[str] | None, typer.Option("--router", help="A router id (repeat): its identity router-<id>; the router takes its id from it.")] = None,
    node: Annotated[list[str] | None, typer.Option("--node", help="A node id (repeat): its identity node-<id>; the node must run with --node-id <id>.")] = None,
    pool: Annotated[list[str] | None, typer.Option("--pool", help="NAME=COUNT (repeat): node ids NAME-0 .. NAME-<COUNT-1>, the pods of a "
                                                   "Kubernetes StatefulSet NAME up to COUNT replicas (its node ids are its pod names).")] = None,
) -> None:
    """Write DIR/<identity>.creds for admin, observer, registry, autoscaler, supervisor, each
    router and each node, and DIR/nats-auth.conf (include it in every nats-server's config).
    Defaults: router r0; nodes prefill-0, decode-0, decode-1 (what deploy/docker-compose.yml
    runs), unless --node or --pool name nodes."""
    routers = router or ["r0"]
    try:
        pooled = [node_id for spec in pool or [] for node_id in pool_node_ids(spec)]
        nodes = [*(node or []), *pooled] if node or pool else ["prefill-0", "decode-0", "decode-1"]
        identities = nats_auth.fabric_identities(routers, nodes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    store = AuthStore(out)
    store.ensure(identities)
    for identity in identities:
        typer.echo(f"{store.creds_path(identity)}  ({identity.role})")
    typer.echo(f"{store.server_config}  (nats-server: include it; public keys and permissions only)")
