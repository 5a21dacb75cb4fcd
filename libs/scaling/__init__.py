"""Autoscaling policies: pure functions and a state machine from load snapshots to decisions.

    tick(state, snapshot, now, config) -> (state, Decision)     tierflow.scaling.machine
    choose_victims(nodes, n) -> [node_id]                        tierflow.scaling.victims
    FleetView (heartbeats -> snapshots), pool_bounds             tierflow.scaling.fleet
    recommend_by_utilization(load)                               the baseline signal alone

Nothing here reads a clock, sleeps or does I/O; the autoscaler service feeds snapshots
and carries out decisions, the simulator does the same in virtual time.
"""

from tierflow.scaling.config import PoolBounds, ScalingConfig
from tierflow.scaling.fleet import FleetView, pool_bounds
from tierflow.scaling.machine import Decision, DeploymentState, PoolDecision, PoolState, tick, tick_pool
from tierflow.scaling.signals import POOL_SIGNALS, SIGNALS, Ask, evaluate, signals_for
from tierflow.scaling.snapshot import DeploymentSnapshot, Mode, Pool, PoolSnapshot
from tierflow.scaling.target import DeploymentLoad, Recommendation, recommend_by_utilization
from tierflow.scaling.victims import NodeLoad, choose_victims
from tierflow.scaling.window import RollingQuantile, quantile

__all__ = [
    "Ask",
    "Decision",
    "DeploymentLoad",
    "DeploymentSnapshot",
    "DeploymentState",
    "FleetView",
    "Mode",
    "NodeLoad",
    "POOL_SIGNALS",
    "Pool",
    "PoolBounds",
    "PoolDecision",
    "PoolSnapshot",
    "PoolState",
    "Recommendation",
    "RollingQuantile",
    "SIGNALS",
    "ScalingConfig",
    "choose_victims",
    "evaluate",
    "pool_bounds",
    "quantile",
    "recommend_by_utilization",
    "signals_for",
    "tick",
    "tick_pool",
]
