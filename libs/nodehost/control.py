"""Server management of one node: cordon, uncordon, drain (a nats.micro endpoint).

A cordoned node takes no new work; the router stops placing on it at its next heartbeat,
which is sent at once, and a request that was already on its way is refused as
retryable so the router moves it. Drain is cordon plus "tell me when it is empty": the
heartbeat shows `draining` and the in-flight count falls to zero, which is when the
autoscaler may stop the process without losing a request.

Every cordon has an owner (`NodeCommand.owner`: "autoscaler", "operator"), kept until
the node is uncordoned and reported in the heartbeat and every reply, so a restarted
autoscaler can tell the cordons it must finish or undo from an operator's. The node
enforces ownership itself (`apply_command`), so a controller acting on a view a moment
old cannot undo a person's decision:

- a cordon held by one owner is not cordoned, drained or uncordoned by another
  controller (the command is refused, naming the owner);
- an operator (or a caller that names no owner: older tools) may do anything, and
  takes the cordon over: a person's word outranks a controller's.

Every cordon, uncordon and drain the node carries out or refuses is an audit record
(`tierflow.audit.node`) naming who sent it (`NodeCommand.by`, else its owner); `status`
reads nothing worth recording. Who may publish node control at all is NATS's business
(the credentials `tierflow up` makes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import msgspec
from nats.micro.request import Request
from nats.micro.service import Service

from tierflow.contracts import messages, subjects
from tierflow.contracts.autoscaler import OPERATOR_OWNER
from tierflow.nodehost.beat import NodeIdentity
from tierflow.runtime.audit import AuditLog

__all__ = ["add_control_endpoint", "apply_command"]

log = logging.getLogger(__name__)


class _InFlight(Protocol):
    @property
    def in_flight(self) -> int: ...


def _outranks(asker: str, holder: str) -> bool:
    """May `asker` change a cordon `holder` owns?"""
    return not holder or not asker or asker == holder or asker == OPERATOR_OWNER


def apply_command(identity: NodeIdentity, command: messages.NodeCommand) -> str:
    """Change `identity` as `command` asks; the refusal (empty: done). Pure, so it is the
    one place these rules live."""
    if command.action == "status":
        return ""
    if identity.cordoned and not _outranks(command.owner, identity.cordon_owner):
        return f"cordoned by {identity.cordon_owner}: {command.owner} may not {command.action} it"
    if command.action == "uncordon":
        identity.cordoned = identity.draining = False
        identity.cordon_owner = ""
        return ""
    identity.cordoned = True
    identity.draining = identity.draining or command.action == "drain"
    identity.cordon_owner = command.owner
    return ""


def _caller(command: messages.NodeCommand) -> str:
    return command.by or (f"{command.owner} (unnamed)" if command.owner else "")


async def add_control_endpoint(micro: Service, identity: NodeIdentity, driver: _InFlight, beat_now: asyncio.Event, audit: AuditLog | None = None) -> None:
    async def handle(request: Request) -> None:
        try:
            command = messages.command_decoder.decode(request.data)
        except msgspec.DecodeError as exc:
            await request.respond_error("400", f"undecodable node command: {exc}")
            return
        refused = apply_command(identity, command)
        if refused:
            log.warning("node %s: refused %s from %s (%s)", identity.node_id, command.action, command.owner or "an unnamed caller", refused,
                        extra={"fields": {"action": command.action, "owner": command.owner, "cordon_owner": identity.cordon_owner}})  # fmt: skip
        elif command.action != "status":
            log.info("node %s: %s by %s", identity.node_id, command.action, command.owner or "an unnamed caller",
                     extra={"fields": {"action": command.action, "owner": command.owner}})  # fmt: skip
            beat_now.set()
        if audit is not None and command.action != "status":
            audit.record("node", command.action, identity=_caller(command), target=identity.node_id, ok=not refused,
                         detail={"owner": command.owner, "cordon_owner": identity.cordon_owner, "in_flight": driver.in_flight,
                                 **({"error": refused} if refused else {})})  # fmt: skip
        reply = messages.NodeCommandReply(
            node_id=identity.node_id, cordoned=identity.cordoned, draining=identity.draining, in_flight=driver.in_flight,
            error=refused, cordon_owner=identity.cordon_owner if identity.cordoned else "",
        )  # fmt: skip
        await request.respond(messages.encoder.encode(reply))

    await micro.add_endpoint(name="control", subject=subjects.node_control(identity.node_id), handler=handle)
