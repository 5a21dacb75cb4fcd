"""What the autoscaler knows of the fleet: deployments (registry) and nodes (heartbeats).

Both are caches, fed from NATS by the autoscaler service and from virtual nodes by the
fleet simulator; `pool_snapshot` and `deployment_snapshot` reduce them to the pure
policy's input, so both scale on the same view. Time is passed in (the receive time of
each heartbeat on the autoscaler's own clock), so staleness never depends on two
machines agreeing about the time.

Freshness, in three bands per node:
- live (heard within 3 of its own heartbeat intervals): ready capacity, or cordoned;
- silent (not live, heard within `forget_after`): not capacity, and, unless its last
  word was that it was cordoned or draining (it was leaving), it makes the pool's
  signal stale, so nothing is scaled down while part of the pool cannot be seen;
- forgotten after that. A node the autoscaler removed itself is forgotten at once and
  its late heartbeats are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tierflow.contracts import messages, registry
from tierflow.scaling.config import PoolBounds
from tierflow.scaling.snapshot import DeploymentSnapshot, PoolSnapshot
from tierflow.scaling.victims import NodeLoad

__all__ = ["FleetView", "pool_bounds"]

MISSED_BEATS = 3.0


@dataclass(slots=True)
class _Heard:
    hb: messages.NodeHeartbeat
    at: float

    def live(self, now: float) -> bool:
        return now - self.at <= MISSED_BEATS * self.hb.interval_s

    @property
    def leaving(self) -> bool:
        return self.hb.cordoned or self.hb.draining


def pool_bounds(record: registry.DeploymentRecord) -> dict[str, PoolBounds]:
    """min/max per pool. The decode pool takes the record's bounds. The registry has no
    bounds for a disaggregated prefill pool yet, so they follow the deployment's
    prefill:decode ratio (`prefill_replicas` : `replicas`), with at least one node."""
    bounds = {"decode": PoolBounds(min_replicas=record.min_replicas, max_replicas=record.max_replicas)}
    if record.mode == "disaggregated":
        ratio = record.prefill_replicas / record.replicas if record.replicas else 1.0
        low = max(1, math.ceil(record.min_replicas * ratio))
        high = max(low, math.ceil(record.max_replicas * ratio))
        bounds["prefill"] = PoolBounds(min_replicas=low, max_replicas=high)
    return bounds


class FleetView:
    def __init__(self, *, forget_after: float = 45.0, tombstone_for: float = 600.0) -> None:
        self.deployments: dict[str, registry.DeploymentRecord] = {}
        self._nodes: dict[str, _Heard] = {}
        self._removed: dict[str, float] = {}  # node id -> when the autoscaler removed it
        self._forget_after = forget_after
        self._tombstone_for = tombstone_for

    # -- feeding ----------------------------------------------------------------------
    def put_deployment(self, record: registry.DeploymentRecord) -> None:
        self.deployments[record.name] = record

    def delete_deployment(self, name: str) -> None:
        self.deployments.pop(name, None)

    def heard(self, hb: messages.NodeHeartbeat, now: float) -> None:
        if hb.node_id in self._removed:
            return  # a late beat of a node we stopped
        self._nodes[hb.node_id] = _Heard(hb, now)

    def removed(self, node_id: str, now: float) -> None:
        """The autoscaler stopped this node: forget it, and ignore its late heartbeats."""
        self._nodes.pop(node_id, None)
        self._removed[node_id] = now

    def expire(self, now: float) -> None:
        for node_id in [k for k, h in self._nodes.items() if now - h.at > self._forget_after and not h.live(now)]:
            del self._nodes[node_id]
        for node_id in [k for k, t in self._removed.items() if now - t > self._tombstone_for]:
            del self._removed[node_id]

    # -- reading ----------------------------------------------------------------------
    def _pool(self, deployment: str, pool: str) -> list[_Heard]:
        return [h for h in self._nodes.values() if h.hb.deployment == deployment and h.hb.role == pool]

    def live_ids(self, deployment: str, pool: str, now: float) -> set[str]:
        """Nodes of the pool heard recently, cordoned ones included."""
        return {h.hb.node_id for h in self._pool(deployment, pool) if h.live(now)}

    def heartbeat(self, node_id: str) -> messages.NodeHeartbeat | None:
        heard = self._nodes.get(node_id)
        return heard.hb if heard is not None else None

    def deployment_snapshot(
        self, record: registry.DeploymentRecord, bounds: Mapping[str, PoolBounds], now: float, *,
        starting: Mapping[str, int], removing: Mapping[str, int],
    ) -> DeploymentSnapshot:
        """What `tierflow.scaling.tick` decides on for one deployment: a snapshot per pool
        in `bounds`, with the nodes the caller is starting and removing per pool."""
        pools = {
            pool: self.pool_snapshot(record.name, pool, now, starting=starting.get(pool, 0), removing=removing.get(pool, 0))
            for pool in bounds
        }
        return DeploymentSnapshot(deployment=record.name, mode=record.mode, pools=pools, bounds=dict(bounds))

    def pool_snapshot(self, deployment: str, pool: str, now: float, *, starting: int = 0, removing: int = 0) -> PoolSnapshot:
        nodes = self._pool(deployment, pool)
        ready = [h.hb for h in nodes if h.live(now) and not h.leaving]
        cordoned = sum(1 for h in nodes if h.live(now) and h.leaving)
        watched = [now - h.at for h in nodes if not h.leaving]  # ready, or silent without having said goodbye
        if not ready:
            return PoolSnapshot(cordoned=cordoned, starting=starting, removing=removing,
                                signal_age=max(watched) if watched else None)  # fmt: skip
        ttfts = [hb.ttft_p95 for hb in ready if hb.ttft_p95 is not None]
        itls = [hb.itl_p95 for hb in ready if hb.itl_p95 is not None]
        return PoolSnapshot(
            ready=len(ready), cordoned=cordoned, starting=starting, removing=removing,
            running=sum(hb.running for hb in ready), waiting=sum(hb.queue_depth for hb in ready),
            batch_slots=sum(hb.max_batch for hb in ready),
            queued_prompt_tokens=sum(hb.queued_prompt_tokens for hb in ready),
            # The worst node's p95: users wait where it is slow, not on the average node.
            ttft_p95=max(ttfts) if ttfts else None, itl_p95=max(itls) if itls else None,
            signal_age=max(watched),
        )  # fmt: skip

    def candidates(self, deployment: str, pool: str, now: float, *, exclude: set[str] | frozenset[str] = frozenset()) -> list[NodeLoad]:
        """Ready nodes of the pool that could be given back, as the victim choice sees them."""
        return [
            NodeLoad(
                node_id=h.hb.node_id, in_flight=max(h.hb.in_flight, h.hb.running + h.hb.queue_depth),
                prefix_cache_blocks=h.hb.prefix_cache_blocks, hot_models=sum(1 for m in h.hb.models if m.tier in ("sram", "hbm")),
                started_at=h.hb.started_at, cordoned=h.leaving,
            )
            for h in self._pool(deployment, pool)
            if h.live(now) and h.hb.node_id not in exclude
        ]  # fmt: skip
