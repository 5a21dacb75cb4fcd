"""The simulated fleet's shape: the fleet file's deployments, rescaled to a node count.

A fleet file says how many nodes each deployment runs; a simulation often wants the
same mix at another size (`tierflow sim --nodes 1000`). `scale_deployments` keeps every
deployment's share of the fleet (largest-remainder rounding, so the total is exactly
the count asked for, and every pool that had a node keeps at least one) and scales
min/max by the same factor, so the autoscaler's bounds still hold the new replica count.

`plan_deployments` then resolves what a node of each deployment is, once per deployment:
its bundle (`tierflow.nodehost.specs.bundle_from_records`, as a live node builds it) and
its hardware. Which models a node preloads into HBM depends on the node
(`tierflow.nodehost.preload.preload_models`, by its ordinal, as a live node chooses), and
so does how long it takes to come up (`start_delay`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from tierflow.contracts import registry
from tierflow.nodehost.specs import bundle_from_records
from tierflow.rdu import BundleModel, HardwareProfile, load_catalog, load_profiles, switch_time
from tierflow.rdu.timing import storage_load_time

__all__ = ["FleetRecords", "DeploymentPlan", "PROCESS_START_S", "scale_deployments", "plan_deployments", "start_delay"]

PROCESS_START_S = 2.0
"""What starting a node process costs before it can load weights (interpreter, NATS
connect, registry read): about what `tierflow up`'s local actuator sees on a laptop."""


class FleetRecords(msgspec.Struct, frozen=True, kw_only=True):
    """A fleet as the registry would hold it: model records and deployment records."""

    models: dict[str, registry.ModelRecord]
    deployments: list[registry.DeploymentRecord]


class DeploymentPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What every node of one deployment runs; built once, shared by all its nodes."""

    record: registry.DeploymentRecord
    bundle: tuple[BundleModel, ...]
    profile: HardwareProfile

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def pools(self) -> tuple[str, ...]:
        """Node roles this deployment runs: decode, and prefill when disaggregated."""
        return ("prefill", "decode") if self.record.mode == "disaggregated" else ("decode",)

    def initial(self, pool: str) -> int:
        return self.record.prefill_replicas if pool == "prefill" else self.record.replicas


def _apportion(sizes: Sequence[int], total: int) -> list[int]:
    """`total` split in proportion to `sizes` (largest remainder); every nonzero size gets
    at least 1, taken from the sizes furthest above their share when that overshoots."""
    whole = sum(sizes)
    quotas = [s * total / whole for s in sizes]
    counts = [max(1, math.floor(q)) if s > 0 else 0 for s, q in zip(sizes, quotas)]
    while sum(counts) > total:  # the minimum of 1 pushed small pools above their share
        i = max((i for i, c in enumerate(counts) if c > 1), key=lambda i: (counts[i] - quotas[i], -i))
        counts[i] -= 1
    while sum(counts) < total:
        i = max((i for i, s in enumerate(sizes) if s > 0), key=lambda i: (quotas[i] - counts[i], -i))
        counts[i] += 1
    return counts


def scale_deployments(records: Sequence[registry.DeploymentRecord], nodes: int) -> list[registry.DeploymentRecord]:
    """The deployments resized so their initial nodes (decode + prefill) add up to `nodes`.

    ValueError when `nodes` is below the number of pools (each keeps at least one node)
    or the fleet has no nodes to scale from.
    """
    pools = [(i, "decode", r.replicas) for i, r in enumerate(records)]
    pools += [(i, "prefill", r.prefill_replicas) for i, r in enumerate(records) if r.mode == "disaggregated"]
    sizes = [size for _, _, size in pools]
    if sum(sizes) == 0:
        raise ValueError("the fleet runs no nodes (every deployment has replicas: 0); nothing to scale")
    needed = sum(1 for s in sizes if s > 0)
    if nodes < needed:
        raise ValueError(f"--nodes {nodes} is fewer than the fleet's {needed} pools; each pool keeps at least one node")
    counts = _apportion(sizes, nodes)
    new = {(i, pool): count for (i, pool, _), count in zip(pools, counts)}
    scaled = []
    for i, r in enumerate(records):
        replicas = new[(i, "decode")]
        factor = replicas / r.replicas if r.replicas else 1.0
        low = min(replicas, round(r.min_replicas * factor))
        high = max(replicas, round(r.max_replicas * factor))
        scaled.append(msgspec.structs.replace(
            r, replicas=replicas, min_replicas=low, max_replicas=high,
            prefill_replicas=new.get((i, "prefill"), r.prefill_replicas),
        ))
    return scaled


def start_delay(profile: HardwareProfile, bundle: Sequence[BundleModel], preload: Sequence[str]) -> float:
    """Seconds from asking for a node to its first heartbeat: the process start, then the
    emulator's cold load of its bundle (every model from storage into DDR, the preloaded
    ones on into HBM). The emulated node itself starts with its weights already in place,
    so the simulator charges that load here, before the node exists."""
    hot = set(preload)
    loads = sum(storage_load_time(b.spec, profile) + (switch_time(b.spec, profile) if b.spec.name in hot else 0.0) for b in bundle)
    return PROCESS_START_S + loads


def plan_deployments(fleet: FleetRecords, *, nodes: int | None = None) -> list[DeploymentPlan]:
    """One plan per deployment that runs nodes (rescaled to `nodes` when given).

    LookupError names a deployment whose bundle or profile cannot be built.
    """
    records = scale_deployments(fleet.deployments, nodes) if nodes is not None else list(fleet.deployments)
    catalog, profiles = load_catalog(None), load_profiles(None)
    plans = []
    for record in records:
        profile = profiles.get(record.profile)
        if profile is None:
            raise LookupError(f"deployment {record.name!r}: hardware profile {record.profile!r} is unknown; known: {', '.join(sorted(profiles))}")
        plans.append(DeploymentPlan(record=record, bundle=tuple(bundle_from_records(record, fleet.models, catalog)), profile=profile))
    return plans

