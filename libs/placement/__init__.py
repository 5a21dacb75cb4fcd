"""Placement: which node serves a request. Pure functions over snapshots of node state.

`NodeView` is what the router knows of a node (from its heartbeats); a policy ranks
the candidates and the router tries them in order (the first is the choice, the rest
are the retry order if it fails before its first token).
"""

from tierflow.placement.basic import NodeView, rank_least_loaded

__all__ = ["NodeView", "rank_least_loaded"]
