"""tierflow.sim: the fleet simulator. A workload spec on a fleet, in virtual time.

The same code as the live fabric, with the network and the clock taken out: the nodes
are `tierflow.rdu.NodeEngine`s (in fast mode) wrapped as the node shell wraps them and
heartbeating through `tierflow.nodehost.beat`; the router's decision path runs over
`tierflow.placement`'s tables with a policy chosen by name; the autoscaler is
`tierflow.scaling.tick` over the service's `FleetView`. No NATS, no asyncio, no sleeping,
no clock: a run is a pure function of (spec, fleet, config), and it writes the same
`RequestRecord`s as the live load generator, so their reports compare.

    simulate(spec, fleet, config) -> SimResult(records, fleet_timeline, stats)

Modules, one job each:

- `config`: `SimConfig` (size, duration, policy, autoscaling, heartbeat, hop latency) and `SimError`
- `fleet`: the fleet file's deployments rescaled to a node count; what a node of each is
- `node`: `SimNode`, one node (engine + the node shell's bookkeeping + heartbeat)
- `router`: `SimRouter`, the router's admission, placement, retries and session books
- `autoscale`: `SimAutoscaler`, the autoscaler's tick and its scale actions
- `client`: session plans run as the live driver runs them; records
- `calls`: `Call`, one model call in flight
- `checks`: what the spec asks that the fleet does not serve
- `loop`: `Simulation`, the event loop that ties them together (`prepare` checks a run first)
- `result`: `SimResult`, `SimStats`, `FleetPoint`
- `shards`: independent deployment groups, to simulate side by side, and merging their results
"""

from collections.abc import Sequence

from tierflow.sim.config import HOP_S, SimConfig, SimError
from tierflow.sim.fleet import FleetRecords
from tierflow.sim.loop import Simulation, prepare
from tierflow.sim.result import FleetPoint, SimResult, SimStats
from tierflow.workload.sessions import SessionPlan
from tierflow.workload.spec import WorkloadSpec

__all__ = ["simulate", "prepare", "SimConfig", "SimError", "HOP_S", "FleetRecords", "SimResult", "SimStats", "FleetPoint", "Simulation"]


def simulate(spec: WorkloadSpec, fleet: FleetRecords, config: SimConfig | None = None, *, plans: Sequence[SessionPlan] | None = None) -> SimResult:
    """Run `spec` on `fleet` in virtual time; SimError says what cannot run, and where.

    `plans`: run these sessions (a trace replay's, `tierflow.workload.replay.plan_replay`)
    instead of the spec's arrivals; the spec still gives the tenants and the SLO.
    """
    return Simulation(spec, fleet, config or SimConfig(), sessions=plans).run()
