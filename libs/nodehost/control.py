"""Server management of one node: cordon, uncordon, drain (a nats.micro endpoint).

A cordoned node takes no new work; the router stops placing on it at its next heartbeat,
which is sent at once, and a request that was already on its way is refused as
retryable so the router moves it. Drain is cordon plus "tell me when it is empty": the
heartbeat shows `draining` and the in-flight count falls to zero, which is when the
autoscaler may stop the process without losing a request.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.micro.request import Request
from nats.micro.service import Service

from tierflow.contracts import messages, subjects
from tierflow.nodehost.driver import EngineDriver
from tierflow.nodehost.beat import NodeIdentity

__all__ = ["add_control_endpoint"]

log = logging.getLogger(__name__)


async def add_control_endpoint(micro: Service, identity: NodeIdentity, driver: EngineDriver, beat_now: asyncio.Event) -> None:
    async def handle(request: Request) -> None:
        try:
            command = messages.command_decoder.decode(request.data)
        except msgspec.DecodeError as exc:
            await request.respond_error("400", f"undecodable node command: {exc}")
            return
        if command.action == "cordon":
            identity.cordoned = True
        elif command.action == "uncordon":
            identity.cordoned = identity.draining = False
        elif command.action == "drain":
            identity.cordoned = identity.draining = True
        if command.action != "status":
            log.info("node %s: %s", identity.node_id, command.action, extra={"fields": {"action": command.action}})
            beat_now.set()
        reply = messages.NodeCommandReply(node_id=identity.node_id, cordoned=identity.cordoned, draining=identity.draining, in_flight=driver.in_flight)
        await request.respond(messages.encoder.encode(reply))

    await micro.add_endpoint(name="control", subject=subjects.node_control(identity.node_id), handler=handle)
