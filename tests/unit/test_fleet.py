"""Fleet files: strict shapes, every problem listed with its path, records as the readers see them."""

from __future__ import annotations

import pathlib

import pytest

from tierflow.services.model_registry.fleet import FleetError, load_fleet, parse_fleet, to_records

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_example_fleet_turns_into_records() -> None:
    models, deployments = to_records(load_fleet(REPO / "deploy/examples/fleet.yaml"))
    assert [m.name for m in models] == ["llama-3.1-8b", "gpt-oss-20b"]
    (dep,) = deployments
    assert dep.name == "default" and dep.replicas == 2 and [e.model for e in dep.models] == ["llama-3.1-8b", "gpt-oss-20b"]
    assert all(e.version == "v1" for e in dep.models)


def test_every_reference_problem_is_listed_with_its_path() -> None:
    text = """
models:
  - name: a
    versions: [{version: v1}]
    default_version: v9
    traffic: {v2: 1}
bundles:
  - name: b
    models: [{model: x}, {model: a, version: v3}]
deployments:
  - name: d
    bundle: nope
    replicas: 5
    max_replicas: 2
"""
    with pytest.raises(FleetError) as err:
        parse_fleet(text)
    problems = err.value.problems
    assert any(p.startswith("$.models[0].default_version") for p in problems)
    assert any(p.startswith("$.models[0].traffic") for p in problems)
    assert any(p.startswith("$.bundles[0].models[0].model") for p in problems)
    assert any(p.startswith("$.bundles[0].models[1].version") for p in problems)
    assert any(p.startswith("$.deployments[0].bundle") for p in problems)
    assert any(p.startswith("$.deployments[0].replicas") for p in problems)


def test_typos_in_keys_are_refused() -> None:
    with pytest.raises(FleetError, match=r"unknown field `replica`"):
        parse_fleet("models: []\nbundles: []\ndeployments: [{name: d, bundle: b, replica: 2}]")


def test_unreadable_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FleetError, match="cannot read"):
        load_fleet(tmp_path / "missing.yaml")
