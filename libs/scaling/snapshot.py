"""What the policy sees of a deployment at one instant: per-pool counts, load and latency.

The shell (services/autoscaler) builds these from heartbeats, the registry and its own
book of nodes it is starting or removing. `None` means *unknown*, never zero: a pool
with no fresh heartbeat has `running=None`, not `running=0`, and the policy treats an
unknown signal as a reason to hold, never to scale down.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from tierflow.scaling.config import PoolBounds

__all__ = ["Pool", "Mode", "PoolSnapshot", "DeploymentSnapshot"]

Pool = Literal["decode", "prefill"]
Mode = Literal["aggregated", "disaggregated"]
Count = Annotated[int, Meta(ge=0)]


class PoolSnapshot(Struct, frozen=True, kw_only=True):
    """One pool (decode or prefill nodes) of a deployment.

    ready      heard recently, taking work: the capacity the load signals were measured on
    cordoned   heard recently, cordoned or draining (leaving, or held out by an operator)
    starting   asked for and not heard yet (counts toward current, so it is not asked twice)
    removing   nodes the autoscaler is draining right now (no further scale-down meanwhile)
    running, waiting, batch_slots, queued_prompt_tokens: sums over the ready nodes
    ttft_p95, itl_p95: the worst p95 the ready nodes report (None: no samples)
    signal_age  seconds since the stalest ready node's heartbeat (None: nothing heard)
    """

    ready: Count = 0
    cordoned: Count = 0
    starting: Count = 0
    removing: Count = 0
    running: Count | None = None
    waiting: Count | None = None
    batch_slots: Count | None = None
    queued_prompt_tokens: Count | None = None
    ttft_p95: float | None = None
    itl_p95: float | None = None
    signal_age: float | None = None

    @property
    def current(self) -> int:
        """Replicas that count as capacity: ready ones and ones on their way."""
        return self.ready + self.starting


class DeploymentSnapshot(Struct, frozen=True, kw_only=True):
    """A bundle deployment: the scaling unit. Aggregated deployments have one pool
    ("decode", whose nodes also prefill); disaggregated ones scale "prefill" and
    "decode" separately, each with its own bounds."""

    deployment: str
    mode: Mode = "aggregated"
    pools: dict[str, PoolSnapshot]
    bounds: dict[str, PoolBounds]
