"""What a node says in its heartbeat, as a pure function of its state.

The decode-node shell and the fleet simulator both build heartbeats here, so the router
and the autoscaler read the same fields from a simulated node as from a live one. The
shell adds what only a process knows (host, pid, wall-clock `sent_at`); the engine's
snapshot and the node's own latency view (`LoadReport`) are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierflow.contracts import messages
from tierflow.rdu import EngineSnapshot

__all__ = ["NodeIdentity", "LoadReport", "build_heartbeat"]


@dataclass(slots=True)
class NodeIdentity:
    """Who a node is and whether it takes work. `started_at` (wall time, set by the shell)
    lets the router tell a restarted node from the one it knew."""

    node_id: str
    role: str
    deployment: str
    region: str
    residency: str
    profile: str
    started_at: float = 0.0
    cordoned: bool = False
    draining: bool = False
    cordon_owner: str = ""  # who cordoned it (tierflow.contracts.autoscaler); "" when not cordoned
    bundle_outdated: bool = False


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What the heartbeat adds to the engine's snapshot for the autoscaler."""

    ttft_p95: float | None
    itl_p95: float | None
    latency_samples: int
    latency_window: float
    in_flight: int
    queued_prompt_tokens: int


def build_heartbeat(
    identity: NodeIdentity,
    snap: EngineSnapshot,
    report: LoadReport,
    *,
    seq: int,
    interval: float,
    sent_at: float,
    host: str = "",
    pid: int = 0,
) -> messages.NodeHeartbeat:
    """The engine's snapshot plus the node's latency and load report, under its identity."""
    return messages.NodeHeartbeat(
        node_id=identity.node_id,
        role=identity.role,  # type: ignore[arg-type]
        deployment=identity.deployment,
        region=identity.region,
        residency=identity.residency,
        profile=identity.profile,
        host=host,
        pid=pid,
        started_at=identity.started_at,
        sent_at=sent_at,
        interval_s=interval,
        seq=seq,
        models=[
            messages.ModelState(
                name=m.name, version=m.version, tier=m.tier, in_flight=m.in_flight, queued=m.queued,
                max_batch=m.max_batch, recent_prefix_hashes=list(m.recent_prefix_hashes),
            )
            for m in snap.models
        ],
        block_size=snap.block_size,
        queue_depth=snap.queue_depth,
        running=snap.running,
        max_batch=snap.max_batch,
        kv_usage=snap.kv_usage,
        prefix_cache_blocks=snap.prefix_cache_blocks.hbm + snap.prefix_cache_blocks.ddr,
        # node-wide list left empty: the per-model lists above say the same, more precisely
        cordoned=identity.cordoned,
        draining=identity.draining,
        cordon_owner=identity.cordon_owner if identity.cordoned else "",
        bundle_outdated=identity.bundle_outdated,
        ttft_p95=report.ttft_p95,
        itl_p95=report.itl_p95,
        latency_samples=report.latency_samples,
        latency_window_s=report.latency_window,
        in_flight=report.in_flight,
        queued_prompt_tokens=report.queued_prompt_tokens,
        power_w=snap.power_w,
        energy_j=snap.energy_joules,
    )
