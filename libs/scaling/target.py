"""Target-utilization scaling: enough replicas that batches run at the target occupancy.

The baseline signal (running + queued requests over batch slots) that the SLO-driven
policies refine. Pure: it sees only the snapshot it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DeploymentLoad", "Recommendation", "recommend_by_utilization"]


@dataclass(frozen=True, slots=True)
class DeploymentLoad:
    deployment: str
    replicas: int          # nodes currently reporting for the deployment
    running: int
    waiting: int
    batch_slots: int       # sum of max batch over those nodes
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True, slots=True)
class Recommendation:
    deployment: str
    current: int
    desired: int
    reason: str
    utilization: float


def recommend_by_utilization(load: DeploymentLoad, target: float = 0.7) -> Recommendation:
    """Replicas needed for (running + waiting) to fill `target` of the batch slots."""
    if not 0 < target <= 1:
        raise ValueError(f"target utilization must be in (0, 1], got {target}")
    if load.replicas == 0 or load.batch_slots == 0:
        desired = max(load.min_replicas, load.replicas)
        return Recommendation(load.deployment, load.replicas, desired, "no load signal: hold (never scale down blind)", 0.0)
    per_replica = load.batch_slots / load.replicas
    utilization = (load.running + load.waiting) / load.batch_slots
    needed = math.ceil((load.running + load.waiting) / (per_replica * target)) if load.running + load.waiting else 0
    desired = min(load.max_replicas, max(load.min_replicas, needed))
    if desired > load.replicas:
        reason = f"utilization {utilization:.2f} above target {target:.2f}"
    elif desired < load.replicas:
        reason = f"utilization {utilization:.2f} below target {target:.2f}"
    else:
        reason = "within target"
    return Recommendation(load.deployment, load.replicas, desired, reason, utilization)
