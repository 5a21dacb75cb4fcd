"""The autoscaler in virtual time: a spike brings nodes up (after their cold load), quiet
takes them back down through cordon -> drain -> stop, and no request is lost on the way."""

from __future__ import annotations

from sim_helpers import fleet_of, spec_of

from tierflow.scaling import ScalingConfig
from tierflow.sim import SimConfig, simulate
from tierflow.sim.fleet import PROCESS_START_S
from tierflow.workload.sessions import plan_sessions

ELASTIC = """
models:
  - {name: small, versions: [{version: v1, catalog: llama-3.1-8b}]}
bundles:
  - {name: small, models: [{model: small, config: ss8192-bs4}]}
deployments:
  - {name: elastic, bundle: small, replicas: 1, min_replicas: 1, max_replicas: 4, profile: sn40l-16}
"""

SPIKE = """
name: spike
seed: 9
mix:
  prompt_tokens: {mean: 800}
  max_tokens: {mean: 400}
  models: [{model: small}]
arrivals:
  - {kind: steady, rate: 0.5, duration_s: 20}
  - {kind: poisson, rate: 16.0, duration_s: 40}
  - {kind: steady, rate: 0.5, duration_s: 200}
"""

# The service's policy with short windows, so a test sees a whole cycle in minutes.
FAST = ScalingConfig(panic_window=5.0, stable_window=30.0, cooldown_up=5.0, cooldown_down=10.0)


def test_a_spike_adds_nodes_and_quiet_removes_them_without_losing_a_request() -> None:
    spec = spec_of(SPIKE)
    result = simulate(spec, fleet_of(ELASTIC), SimConfig(seed=9, scaling=FAST))
    stats = result.stats
    planned = sum(len(plan.calls) for plan in plan_sessions(spec, seed=9))
    assert len(result.records) == planned > 600
    assert all(r.outcome == "ok" for r in result.records)  # drained before stopped: nothing lost
    ups = [e for e in stats.scale_events if e.action == "up"]
    downs = [e for e in stats.scale_events if e.action == "down"]
    assert ups and 20 < ups[0].t < 35  # within seconds of the spike starting at 20 s
    assert stats.nodes_peak == 4 and stats.nodes_started == 3
    assert downs and downs[0].t > 60  # only once the spike is over
    assert stats.nodes_stopped == 3 and stats.nodes_final == 1
    served = {r.node for r in result.records}
    assert {"elastic-decode-1", "elastic-decode-2", "elastic-decode-3"} <= served  # the new nodes took work
    # a new node serves only after its start: the process, then its cold load of the bundle
    first_up = min(p.t for p in result.fleet_timeline if p.nodes > 1)
    assert first_up - ups[0].t >= PROCESS_START_S


def test_without_autoscaling_the_fleet_stays_as_it_started_and_the_spike_queues() -> None:
    fixed = simulate(spec_of(SPIKE), fleet_of(ELASTIC), SimConfig(seed=9, autoscale=False))
    scaled = simulate(spec_of(SPIKE), fleet_of(ELASTIC), SimConfig(seed=9, scaling=FAST))
    assert fixed.stats.scale_events == [] and fixed.stats.nodes_peak == 1
    assert {r.node for r in fixed.records} == {"elastic-decode-0"}
    worst = {name: max(r.first_token_at - r.sent_at for r in result.records) for name, result in (("fixed", fixed), ("scaled", scaled))}
    assert worst["fixed"] > 2 * worst["scaled"] > 2.0  # one node queues the whole spike; four share it
