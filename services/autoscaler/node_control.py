"""Talking to one node's control endpoint (cordon, uncordon, drain, status).

A port, so the shell's scale-down sequence can be tested without nodes; `NatsNodeControl`
is the real one (the same endpoint `tierflow nodes drain` uses). Every command names the
autoscaler as its owner: the node keeps the owner of a cordon, reports it, and refuses a
controller that would change a cordon someone else owns (`NodeRefused`), so the
autoscaler can never uncordon or drain a node an operator cordoned.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from tierflow.contracts import messages, subjects
from tierflow.contracts.autoscaler import AUTOSCALER_OWNER

__all__ = ["NodeControl", "NodeControlError", "NodeRefused", "NatsNodeControl"]


class NodeControlError(Exception):
    """The node did not answer, or answered with an error."""


class NodeRefused(NodeControlError):
    """The node answered and refused (e.g. an operator owns its cordon): it is not in doubt."""


class NodeControl(Protocol):
    async def command(self, node_id: str, action: str) -> messages.NodeCommandReply: ...


class NatsNodeControl:
    def __init__(self, nc: NATS, *, timeout: float = 3.0, owner: str = AUTOSCALER_OWNER, by: str = "") -> None:
        self._nc = nc
        self._timeout = timeout
        self._owner = owner
        self._by = by  # who sends, for the node's audit record (autoscaler:<instance>)

    async def command(self, node_id: str, action: str) -> messages.NodeCommandReply:
        payload = messages.encoder.encode(messages.NodeCommand(action=action, owner=self._owner, by=self._by))  # type: ignore[arg-type]
        try:
            msg = await self._nc.request(subjects.node_control(node_id), payload, timeout=self._timeout)
            reply = messages.command_reply_decoder.decode(msg.data)
        except (NatsError, msgspec.DecodeError) as exc:
            raise NodeControlError(f"node {node_id} did not take {action}: {type(exc).__name__} {exc}") from None
        if reply.error:
            raise NodeRefused(f"node {node_id} refused {action}: {reply.error}")
        return reply
