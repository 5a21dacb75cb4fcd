"""Helpers for the simulator's tests: fleets and specs from YAML text, a run in one call."""

from __future__ import annotations

from tierflow.services.model_registry.fleet import parse_fleet, to_records
from tierflow.sim import FleetRecords, SimConfig, SimResult, simulate
from tierflow.workload.spec import WorkloadSpec, parse_spec


def fleet_of(text: str) -> FleetRecords:
    """A fleet file's records, as `tierflow sim --fleet` reads them."""
    state = to_records(parse_fleet(text))
    return FleetRecords(models=dict(state.models), deployments=list(state.deployments.values()))


def spec_of(text: str) -> WorkloadSpec:
    return parse_spec(text)


def run(spec: str, fleet: str, **config: object) -> SimResult:
    return simulate(spec_of(spec), fleet_of(fleet), SimConfig(**config))  # type: ignore[arg-type]
