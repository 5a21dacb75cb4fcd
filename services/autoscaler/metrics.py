"""The autoscaler's Prometheus metrics (in the service's own CollectorRegistry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AutoscalerMetrics"]


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "tierflow_autoscaler_decisions", "Scaling decisions (holds included) by pool, action and deciding signal",
            ("deployment", "pool", "action", "signal"), registry=registry,
        )  # fmt: skip
        self.current = Gauge("tierflow_autoscaler_current_replicas", "Ready plus starting replicas", ("deployment", "pool"), registry=registry)
        self.desired = Gauge("tierflow_autoscaler_desired_replicas", "Replicas the policy asks for", ("deployment", "pool"), registry=registry)
        self.actuations = Counter(
            "tierflow_autoscaler_actuations", "Actuator calls by operation (start, stop, drain, reclaim) and outcome",
            ("deployment", "pool", "operation", "outcome"), registry=registry,
        )  # fmt: skip
        self.drain_seconds = Histogram(
            "tierflow_autoscaler_drain_seconds", "Cordon to empty, per removed node", ("deployment", "pool"),
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=registry,
        )  # fmt: skip
        self.heartbeats_rejected = Counter(
            "tierflow_autoscaler_heartbeats_rejected", "Node heartbeats not believed, by reason (tierflow.placement.heartbeats.REASONS)",
            ("reason",), registry=registry,
        )  # fmt: skip
        self.leader = Gauge("tierflow_autoscaler_leader", "1 while this instance holds the lease and acts, 0 while it stands by", registry=registry)
        self.lease_term = Gauge("tierflow_autoscaler_lease_term", "The lease term this instance holds or last held (0: never)", registry=registry)
        self.recovered = Counter(
            "tierflow_autoscaler_recovered_removals",
            "Removal records found with no removal running here (a predecessor's, or one left in doubt), by what became of them: "
            "resumed (finished or taken back by the policy), gone (the node no longer answers), not_ours (uncordoned, or "
            "cordoned by someone else since), undone (its deployment left the registry)",
            ("outcome",), registry=registry,
        )  # fmt: skip
