"""The simulator admits through the tenant's quota as the router does: reserved at
admission, settled at the end, never overshot (tierflow.placement.tenants)."""

from __future__ import annotations

from sim_helpers import fleet_of, spec_of

from tierflow.sim import SimConfig, Simulation

FLEET = """
models:
  - {name: small, versions: [{version: v1, catalog: llama-3.1-8b}]}
bundles:
  - {name: b, models: [{model: small, config: ss8192-bs4}]}
deployments:
  - {name: d, bundle: b, replicas: 1, min_replicas: 1, max_replicas: 1, profile: sn40l-16}
"""

SPEC = """
name: chat
seed: 3
mix:
  weight: 1.0
  prompt_tokens: {mean: 300}
  max_tokens: {mean: 32}
  models: [{model: small}]
arrivals:
  - {kind: poisson, rate: 4.0, duration_s: 30}
"""


def test_a_simulated_tenant_is_held_to_its_quota_without_overshoot() -> None:
    quota = 20_000
    config = SimConfig(seed=3, autoscale=False, router_config={
        "tenants": [{"name": "t", "api_keys": ["tierflow"], "token_quota": quota, "quota_window_s": 86400}]})  # the spec's default key
    result = Simulation(spec_of(SPEC), fleet_of(FLEET), config).run()
    served = [r for r in result.records if r.outcome == "ok"]
    refused = [r for r in result.records if r.error == "insufficient_quota"]
    assert served and refused, (len(served), len(refused))
    used = sum(r.prompt_tokens + r.completion_tokens for r in served)
    assert quota - 400 < used <= quota  # used up to the last request that fit, never past it
