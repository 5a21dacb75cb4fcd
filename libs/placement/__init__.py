"""Placement: which node serves a request. Pure over snapshots of node state.

No asyncio, no I/O, no clock reads (`now` is always passed in), so the same code runs in
the router, in tests and in the virtual-time fleet simulator.

- `view`: `NodeView` (a node as of its last heartbeat; `NodeView.from_heartbeat`),
  `ModelSlot`, and `FleetIndex` (views grouped by model).
- `request`: `PlacementRequest` and the tenant's `Boundary`.
- `filters`: `eligible` (health, model/version, region/residency fail-closed, already
  tried) and `diagnose` -> `NoEligibleNode` with a reason fit for a 503.
- `policy`: the `PlacementPolicy` interface and its result, `Placement` of `Choice`s.
- `scoring`: `HotnessAware` with `PlacementWeights` (tier, prefix overlap, load,
  session affinity, workload class; all in estimated seconds).
- `baselines`: `RoundRobin`, `LeastLoaded`, `Random`; `registry`: `POLICIES` by name.
- `tenants`: API keys -> `Tenant` (models, boundary, rate limit, token quota).
- `sessions`: `SessionTable`, the bounded session -> nodes map.
- `tables`: `NodeTable` (views from heartbeats, plus what a dispatch will do until the
  next one) and `ModelTable` (served models, traffic splits, switch costs per deployment).

Per request the router: authenticates (`TenantDirectory.authenticate`), checks the
tenant's model, rate limit and quota, hashes the prompt once (`rdu.block_hashes`), looks
up the session's last node, and calls `policy.rank(index.serving(model), request, now,
limit=...)`; a `NoEligibleNode` becomes a 503 carrying its `reason`.
"""

from tierflow.placement.baselines import LeastLoaded, Random, RoundRobin
from tierflow.placement.basic import rank_least_loaded
from tierflow.placement.filters import Candidate, IneligibleCode, NoEligibleNode, diagnose, eligible
from tierflow.placement.policy import Choice, Placement, PlacementPolicy, prefix_run
from tierflow.placement.registry import POLICIES, PlacementConfig, PolicyFactory, make_policy
from tierflow.placement.request import ANYWHERE, Boundary, PlacementRequest, RequestWorkload
from tierflow.placement.scoring import BatchTurn, HotnessAware, PlacementWeights, PrefillRate, SwitchCost
from tierflow.placement.sessions import SessionInfo, SessionTable, session_key
from tierflow.placement.tables import ModelRoute, ModelTable, NodeTable
from tierflow.placement.tenants import (
    RateLimiter,
    Tenant,
    TenantConfigError,
    TenantDirectory,
    TenantPolicy,
    TokenQuota,
    hash_api_key,
    salted_key_hash,
)
from tierflow.placement.view import MISSED_BEATS, TIER_RANK, DeploymentWorkload, FleetIndex, ModelSlot, NodeView

__all__ = [
    # view
    "MISSED_BEATS",
    "TIER_RANK",
    "DeploymentWorkload",
    "ModelSlot",
    "NodeView",
    "FleetIndex",
    # request
    "ANYWHERE",
    "Boundary",
    "PlacementRequest",
    "RequestWorkload",
    # filters
    "Candidate",
    "IneligibleCode",
    "NoEligibleNode",
    "eligible",
    "diagnose",
    # policies
    "Choice",
    "Placement",
    "PlacementPolicy",
    "prefix_run",
    "HotnessAware",
    "PlacementWeights",
    "SwitchCost",
    "BatchTurn",
    "PrefillRate",
    "RoundRobin",
    "LeastLoaded",
    "Random",
    "POLICIES",
    "PolicyFactory",
    "PlacementConfig",
    "make_policy",
    "rank_least_loaded",
    # tenants and sessions
    "TenantPolicy",
    "Tenant",
    "TenantDirectory",
    "TenantConfigError",
    "RateLimiter",
    "TokenQuota",
    "hash_api_key",
    "salted_key_hash",
    "NodeTable",
    "ModelTable",
    "ModelRoute",
    "SessionInfo",
    "SessionTable",
    "session_key",
]
