"""Autoscaling policies: pure functions from load snapshots to desired replica counts."""

from tierflow.scaling.target import DeploymentLoad, Recommendation, recommend_by_utilization

__all__ = ["DeploymentLoad", "Recommendation", "recommend_by_utilization"]
