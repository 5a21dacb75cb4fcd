"""Stand-ins shared by the autoscaler's tests: a node's control endpoint on a real NATS."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

from tierflow.contracts import messages, subjects
from tierflow.nodehost.beat import NodeIdentity
from tierflow.nodehost.control import apply_command

__all__ = ["FakeNode"]


@dataclass
class FakeNode:
    """A node's control endpoint on NATS: answers cordon/drain/status with an in-flight count
    that falls by one per status poll (requests finishing while it drains). Cordon owners
    follow the real node's rules (`nodehost.control.apply_command`)."""

    node_id: str
    in_flight: int = 0
    commands: list[str] = field(default_factory=list)
    identity: NodeIdentity | None = None
    cordoned_by: str = ""  # start cordoned by this owner ("": not cordoned)
    on_command: Callable[[str], Awaitable[None]] | None = None  # called before each command is applied

    @property
    def cordoned(self) -> bool:
        return self.identity is not None and self.identity.cordoned

    @property
    def owner(self) -> str:
        return self.identity.cordon_owner if self.identity is not None else ""

    async def serve(self, nc: NATS) -> None:
        self.identity = NodeIdentity(node_id=self.node_id, role="decode", deployment="", region="", residency="", profile="",
                                     cordoned=bool(self.cordoned_by), draining=bool(self.cordoned_by), cordon_owner=self.cordoned_by)  # fmt: skip

        async def handle(msg: object) -> None:
            command = messages.command_decoder.decode(msg.data)  # type: ignore[attr-defined]
            self.commands.append(command.action)
            if self.on_command is not None:
                await self.on_command(command.action)
            assert self.identity is not None
            refused = apply_command(self.identity, command)
            if command.action == "status" and self.in_flight:
                self.in_flight -= 1
            reply = messages.NodeCommandReply(node_id=self.node_id, cordoned=self.identity.cordoned, draining=self.identity.draining,
                                              in_flight=self.in_flight, error=refused, cordon_owner=self.identity.cordon_owner)  # fmt: skip
            await nc.publish(msg.reply, messages.encoder.encode(reply))  # type: ignore[attr-defined]

        await nc.subscribe(subjects.node_control(self.node_id), cb=handle)
