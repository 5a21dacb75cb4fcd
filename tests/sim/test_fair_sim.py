"""The simulator's router admits through the live router's `Admission` (issue 21): an
interactive tenant beside a batch flood of 24x its rate keeps its TTFT, and a class above
a tenant's allowance is the live router's 403."""

from __future__ import annotations

from sim_helpers import fleet_of, spec_of

from tierflow.placement.admission import AdmissionConfig
from tierflow.sim import SimConfig
from tierflow.sim.loop import Simulation

FLEET = """
models:
  - name: chat
    versions: [{version: v1, catalog: llama-3.1-8b}]
bundles:
  - name: chat
    models: [{model: chat, config: ss8192-bs8}]
deployments:
  - {name: chat, bundle: chat, replicas: 1, min_replicas: 1, max_replicas: 1}
"""
ROUTER = {"tenants": [
    {"name": "steady", "api_keys": ["sk-steady"], "request_class": "interactive"},
    {"name": "flood", "api_keys": ["sk-flood"], "request_class": "batch"},
]}  # fmt: skip
STEADY = 0.75  # calls/s of 512 tokens: ~0.5 s each alone on one node of 8 slots


def _spec(flood: float, steady_class: str | None = None) -> str:
    asks = {"steady": f", request_class: {steady_class}" if steady_class else ""}
    tenants = "\n".join(f"  - {{name: {n}, api_key: sk-{n}, weight: {r}{asks.get(n, '')}}}" for n, r in (("steady", STEADY), ("flood", flood)) if r)
    return f"""
name: fair
seed: 3
tenants:
{tenants}
mix:
  prompt_tokens: {{mean: 300, sd: 80, min: 50, max: 800}}
  max_tokens: {{mean: 512}}
  models: [{{model: chat}}]
arrivals:
  - {{kind: poisson, rate: {STEADY + flood}, duration_s: 90}}
"""


def _run(flood: float, admission: AdmissionConfig | None) -> tuple[list[float], Simulation]:
    sim = Simulation(spec_of(_spec(flood)), fleet_of(FLEET), SimConfig(router_config=ROUTER, admission=admission, autoscale=False, seed=3))
    records = sim.run().records
    return sorted(r.first_token_at - r.sent_at for r in records if r.tenant == "steady" and r.outcome == "ok"), sim


def _p95(values: list[float]) -> float:
    return values[int(0.95 * len(values))]


def test_an_interactive_tenant_beside_a_batch_flood_keeps_its_ttft() -> None:
    alone, _ = _run(0.0, AdmissionConfig())
    unguarded, _ = _run(24 * STEADY, None)
    guarded, sim = _run(24 * STEADY, AdmissionConfig())
    # Without admission the nodes' class order and preemption keep the interactive tenant
    # ahead too (tests/rdu/test_fair_queueing.py); with it, the flood is also held at the door.
    assert _p95(unguarded) <= 1.2 * _p95(alone)
    assert len(guarded) == len(unguarded) and _p95(guarded) <= 1.2 * _p95(alone)  # every call, at its TTFT alone
    assert sim.router.admission is not None
    flows = {(f.tenant, f.request_class): f for f in sim.router.admission.flows()}
    assert set(flows) == {("steady", "interactive"), ("flood", "batch")}  # the router tenants' classes
    assert flows["steady", "interactive"].refused == 0 and flows["flood", "batch"].refused > 0
    assert all(f.in_flight == 0 for f in flows.values())  # every ticket given back


def test_a_class_above_the_tenants_allowance_is_a_403() -> None:
    router = {"tenants": [{"name": "steady", "api_keys": ["sk-steady"], "request_class": "batch"}]}
    spec = spec_of(_spec(0.0, steady_class="interactive"))  # the spec tenant asks above what the router tenant allows
    sim = Simulation(spec, fleet_of(FLEET), SimConfig(router_config=router, admission=AdmissionConfig(), autoscale=False, seed=3))
    records = sim.run().records
    assert records and all(r.status == 403 and "request_class_not_allowed" in r.error for r in records)
