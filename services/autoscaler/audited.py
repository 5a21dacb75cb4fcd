"""Scaling actions into the audit stream: an `Actuator` that records what it was asked to do.

Wraps whichever actuator the settings chose, so every connector (local, Kubernetes,
virtual) is audited the same way without knowing of it: `start_nodes` becomes a
`scale_up` record (deployment/pool, how many, the ids when known), `stop_node` a
`stop_node` record; a failed one is recorded with `ok: false` and its error, then raised
as before. The cordon and drain of a scale-down are recorded by the nodes themselves
(`tierflow.audit.node`, with the autoscaler as `by`). Recording never blocks or fails the
action (`runtime.audit`). An inner actuator that can count its nodes
(`SupportsInventory`) or chooses which nodes a scale-down removes (`ChoosesVictims`, the
Kubernetes one) is wrapped by a class that can too, so optional abilities stay optional
(checked with isinstance, not by attribute lookup at call time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tierflow.contracts import registry
from tierflow.runtime.audit import AuditLog
from tierflow.scaling.victims import NodeLoad
from tierflow.services.autoscaler.actuators import Actuator, ChoosesVictims, SupportsInventory

__all__ = ["AuditedActuator"]


class AuditedActuator:
    def __init__(self, inner: Actuator, audit: AuditLog, identity: str) -> None:
        self._inner = inner
        self._audit = audit
        self._identity = identity
        self.name = inner.name

    @classmethod
    def wrap(cls, inner: Actuator | None, audit: AuditLog | None, identity: str) -> Actuator | None:
        """`inner` audited; as it is when there is no actuator (advisory) or no audit log."""
        if inner is None or audit is None:
            return inner
        inventory, victims = isinstance(inner, SupportsInventory), isinstance(inner, ChoosesVictims)
        kind = {(True, True): _AuditedInventoryVictims, (True, False): _AuditedInventory, (False, True): _AuditedVictims}.get((inventory, victims), cls)
        return kind(inner, audit, identity)

    async def start_nodes(self, deployment: registry.DeploymentRecord, pool: str, count: int) -> list[str]:
        target = f"{deployment.name}/{pool}"
        try:
            started = await self._inner.start_nodes(deployment, pool, count)
        except Exception as exc:
            self._audit.record("scaling", "scale_up", identity=self._identity, target=target, ok=False,
                               detail={"count": count, "actuator": self.name, "error": str(exc)})  # fmt: skip
            raise
        self._audit.record("scaling", "scale_up", identity=self._identity, target=target,
                           detail={"count": count, "started": started, "actuator": self.name})  # fmt: skip
        return started

    async def stop_node(self, deployment: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        detail: dict[str, Any] = {"deployment": deployment.name, "pool": pool, "actuator": self.name}
        try:
            await self._inner.stop_node(deployment, pool, node_id)
        except Exception as exc:
            self._audit.record("scaling", "stop_node", identity=self._identity, target=node_id, ok=False, detail={**detail, "error": str(exc)})
            raise
        self._audit.record("scaling", "stop_node", identity=self._identity, target=node_id, detail=detail)


class _AuditedInventory(AuditedActuator):
    async def provisioned(self, deployment: registry.DeploymentRecord, pool: str) -> int:
        return await self._inner.provisioned(deployment, pool)  # type: ignore[attr-defined]


class _AuditedVictims(AuditedActuator):
    def choose_victims(self, deployment: registry.DeploymentRecord, pool: str, nodes: Sequence[NodeLoad], count: int) -> list[str]:
        return self._inner.choose_victims(deployment, pool, nodes, count)  # type: ignore[attr-defined]


class _AuditedInventoryVictims(_AuditedInventory, _AuditedVictims):
    pass
