"""`tierflow nodes`: list nodes, and cordon / uncordon / drain one.

Commands go to the node itself (its nats.micro `control` endpoint), which changes its
state and heartbeats at once; the router and autoscaler learn it from the heartbeat.
They are sent as the "operator": the node remembers who cordoned it, and the autoscaler
never uncordons, drains or stops a node an operator cordoned. Each names `operator:user@host`
as its sender (`NodeCommand.by`), which the node writes to the audit stream.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import nats
import typer
from rich.console import Console

from tierflow.cli.nats_connect import connect_once
from tierflow.cli.status import collect_status, render_nodes
from tierflow.contracts import messages, subjects
from tierflow.contracts.autoscaler import OPERATOR_OWNER
from tierflow.runtime.admin_token import who_am_i

__all__ = ["app"]

app = typer.Typer(help="Server management: list nodes, cordon, uncordon, drain.", no_args_is_help=True)
NatsUrl = Annotated[str, typer.Option(envvar="TIERFLOW_NATS_URL", help="NATS server of the fabric")]
console = Console()


async def send_command(nats_url: str, node_id: str, action: str, *, owner: str = OPERATOR_OWNER, timeout: float = 3.0) -> messages.NodeCommandReply:
    nc = await connect_once(nats_url, name="tierflow-nodes")
    try:
        command = messages.NodeCommand(action=action, owner=owner, by=f"{owner}:{who_am_i()}")  # type: ignore[arg-type]
        msg = await nc.request(subjects.node_control(node_id), messages.encoder.encode(command), timeout=timeout)
        return messages.command_reply_decoder.decode(msg.data)
    finally:
        await nc.close()


def _command(node_id: str, action: str, nats_url: str) -> None:
    try:
        reply = asyncio.run(send_command(nats_url, subjects.check_token(node_id, "node id"), action))
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        console.print(f"[red]no node {node_id!r} answered[/red]; `tierflow nodes list` shows the live ones")
        raise typer.Exit(1) from None
    except ConnectionError as exc:  # connect_once's message says what to do
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except (OSError, nats.errors.Error) as exc:
        console.print(f"[red]cannot reach NATS at {nats_url}[/red]: {exc}")
        raise typer.Exit(2) from None
    state = "draining" if reply.draining else "cordoned" if reply.cordoned else "ready"
    if reply.cordoned and reply.cordon_owner:
        state += f" (by {reply.cordon_owner})"
    if reply.error:
        console.print(f"[red]{reply.node_id} refused {action}[/red]: {reply.error}; it is {state}")
        raise typer.Exit(1)
    console.print(f"{reply.node_id}: {state}, {reply.in_flight} request(s) in flight")


@app.command("list")
def list_nodes(nats_url: NatsUrl = "nats://127.0.0.1:4222") -> None:
    """Nodes heard on their heartbeats, with models, tiers and load."""
    try:
        st = asyncio.run(collect_status(nats_url))
    except ConnectionError as exc:
        console.print(f"[red]tierflow is not running:[/red] {exc}")
        raise typer.Exit(2) from None
    render_nodes(st, console)


@app.command()
def cordon(node_id: str, nats_url: NatsUrl = "nats://127.0.0.1:4222") -> None:
    """Take no new work on NODE_ID (in-flight requests continue)."""
    _command(node_id, "cordon", nats_url)


@app.command()
def uncordon(node_id: str, nats_url: NatsUrl = "nats://127.0.0.1:4222") -> None:
    """Put NODE_ID back in rotation."""
    _command(node_id, "uncordon", nats_url)


@app.command()
def drain(node_id: str, nats_url: NatsUrl = "nats://127.0.0.1:4222") -> None:
    """Cordon NODE_ID and let its in-flight requests finish (then it is safe to stop)."""
    _command(node_id, "drain", nats_url)
