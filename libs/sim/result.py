"""What a simulation hands back: the records, the fleet over time, and the run's figures."""

from __future__ import annotations

import msgspec

from tierflow.sim.autoscale import ScaleEvent
from tierflow.workload.records import RequestRecord
from tierflow.workload.report import FleetSample

__all__ = ["FleetPoint", "SimStats", "SimResult"]


class FleetPoint(msgspec.Struct, frozen=True, kw_only=True):
    """The fleet at virtual time `t`: nodes up (and, of those, draining), nodes on their way,
    the requests running and queued on them (as of their last heartbeats), the chip's busy
    share over the sampling interval that ends here, and the nodes up per deployment."""

    t: float
    nodes: int
    starting: int
    draining: int
    running: int
    queued: int
    busy_share: float
    by_deployment: dict[str, int]


class SimStats(msgspec.Struct, frozen=True, kw_only=True):
    """The run's own figures (wall time is the caller's to measure: the simulator reads no clock).

    `utilisation`: chip busy time over node-up time, all nodes (the engine's `busy_seconds`:
    loads, prefills and decode steps), and `by_deployment` the same per deployment.
    `events`: events the loop processed.
    `energy_j`: what every node drew while up (`tierflow.rdu.energy`: its work at active
    power, loads and idle gaps included, idle at idle power where published), and
    `tokens_per_kwh` the fleet's: completion tokens of ok requests per kWh of it (None: no
    node has a power figure). A report's per-model figures count the requests' shares only.
    """

    virtual_s: float
    events: int
    sessions: int
    calls: int
    heartbeats: int
    node_seconds: float
    busy_seconds: float
    utilisation: float
    by_deployment: dict[str, float]
    nodes_initial: int
    nodes_peak: int
    nodes_final: int
    nodes_started: int
    nodes_stopped: int
    scale_events: list[ScaleEvent]
    energy_j: float = 0.0
    tokens_per_kwh: float | None = None


class SimResult(msgspec.Struct, frozen=True, kw_only=True):
    records: list[RequestRecord]
    fleet_timeline: list[FleetPoint]
    stats: SimStats

    def fleet_samples(self) -> list[FleetSample]:
        """The timeline as `build_report(..., fleet_timeline=...)` takes it."""
        return [FleetSample(p.t, p.nodes, p.running, p.queued) for p in self.fleet_timeline]
