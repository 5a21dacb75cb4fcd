"""Registry metrics: what changed, which writes lost a race, and how admin calls ended.

Labels are bounded: kind (3, and 'apply' for conflicts), op (3), method (the RPCs), code (gRPC status names).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["RegistryMetrics"]


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        kw = {"registry": registry}
        self.changes = Counter("tierflow_registry_changes", "Records the registry committed, by kind and op (create, update, delete)", ("kind", "op"), **kw)
        self.conflicts = Counter("tierflow_registry_write_conflicts", "Compare-and-set writes that lost a race (then retried or reported), by kind ('apply': a whole apply's batch)", ("kind",), **kw)
        self.calls = Counter("tierflow_registry_admin_calls", "Admin API calls, by method and gRPC status code", ("method", "code"), **kw)
