"""The local actuator: node processes started and stopped by `tierflow up`.

`tierflow up` owns the processes (so they die with it and log where its other children
log); this actuator asks it over NATS (`subjects.SUPERVISOR_CONTROL`) to start a node of
a role for a deployment, to stop a named one, or to list what it runs.
"""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tierflow.contracts import messages, registry, subjects
from tierflow.services.autoscaler.actuators import ActuatorError

__all__ = ["LocalActuator"]


class LocalActuator:
    name = "local"

    def __init__(self, nc: NATS, *, timeout: float = 30.0) -> None:
        self._nc = nc
        self._timeout = timeout

    async def _call(self, command: messages.SupervisorCommand) -> messages.SupervisorReply:
        try:
            msg = await self._nc.request(subjects.SUPERVISOR_CONTROL, messages.encoder.encode(command), timeout=self._timeout)
        except NoRespondersError:
            raise ActuatorError("no local supervisor answers (is this fabric run by `tierflow up`?)") from None
        except NatsTimeout:
            raise ActuatorError(f"the local supervisor did not answer {command.action} within {self._timeout:g}s") from None
        except NatsError as exc:
            raise ActuatorError(f"cannot reach the local supervisor: {exc}") from None
        try:
            reply = messages.supervisor_reply_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            raise ActuatorError(f"undecodable supervisor reply: {exc}") from None
        if not reply.ok:
            raise ActuatorError(f"supervisor refused to {command.action}: {reply.error}")
        return reply

    async def start_nodes(self, deployment: registry.DeploymentRecord, pool: str, count: int) -> list[str]:
        started = []
        for _ in range(count):
            reply = await self._call(messages.SupervisorCommand(action="start", role=pool, deployment=deployment.name, region=deployment.region))  # type: ignore[arg-type]
            started.append(reply.node_id)
        return started

    async def stop_node(self, deployment: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        await self._call(messages.SupervisorCommand(action="stop", node_id=node_id))

    async def provisioned(self, deployment: registry.DeploymentRecord, pool: str) -> int:
        reply = await self._call(messages.SupervisorCommand(action="list"))
        return sum(1 for n in reply.nodes if n.deployment == deployment.name and n.role == pool)
