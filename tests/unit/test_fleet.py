"""Fleet files: strict shapes, every problem listed with its path, records as the readers see them,
and what re-applying a file means for what the registry already holds."""

from __future__ import annotations

import pathlib

import pytest
from msgspec import structs

from tierflow.contracts import registry
from tierflow.services.model_registry.desired import desired_state
from tierflow.services.model_registry.fleet import FleetError, decode_fleet, load_fleet, parse_fleet, to_records
from tierflow.services.model_registry.mutations import add_version, rollout

REPO = pathlib.Path(__file__).resolve().parents[2]

TWO_VERSIONS = """
models:
  - name: chat
    versions:
      - {version: v1, catalog: llama-3.1-8b}
      - {version: v2, catalog: llama-3.1-8b}
bundles:
  - name: stable
    models: [{model: chat, version: v1}]
  - name: canary
    models: [{model: chat}]
deployments:
  - {name: stable, bundle: stable, replicas: 2, max_replicas: 4}
  - {name: canary, bundle: canary}
"""


def test_example_fleet_turns_into_records() -> None:
    state = to_records(load_fleet(REPO / "deploy/examples/fleet.yaml"))
    assert list(state.models) == ["llama-3.1-8b", "gpt-oss-20b"]
    assert list(state.bundles) == ["agents"]
    (dep,) = state.deployments.values()
    assert dep.name == "default" and dep.replicas == 2 and [e.model for e in dep.models] == ["llama-3.1-8b", "gpt-oss-20b"]
    assert all(e.version == "v1" for e in dep.models) and dep.workload == "bundle" and dep.models == state.bundles["agents"].models


def test_every_reference_problem_is_listed_with_its_path() -> None:
    text = """
models:
  - name: a
    versions: [{version: v1, catalog: llama-3.1-8b}]
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
    for path in ("$.models[0].default_version", "$.models[0].traffic", "$.bundles[0].models[0].model",
                 "$.bundles[0].models[1].version", "$.deployments[0].bundle", "$.deployments[0].replicas"):  # fmt: skip
        assert any(p.startswith(path + ":") for p in problems), (path, problems)


def test_typos_in_keys_are_refused() -> None:
    with pytest.raises(FleetError, match=r"unknown field `replica`"):
        parse_fleet("models: []\nbundles: []\ndeployments: [{name: d, bundle: b, replica: 2}]")


def test_every_malformed_item_is_reported_not_just_the_first() -> None:
    text = """
models:
  - {name: a, versions: [{version: v1, catalogue: x}]}
bundles: []
deployments:
  - {name: d, bundle: b, replicas: many}
  - {name: e, bundle: b, workload: batchy}
  - {name: d, bundle: b}
extras: 1
"""
    with pytest.raises(FleetError) as err:
        decode_fleet(text)
    problems = err.value.problems
    assert any(p.startswith("$.extras: unknown section") for p in problems)
    assert any(p.startswith("$.models[0].versions[0]:") and "catalogue" in p for p in problems)
    assert any(p.startswith("$.deployments[0].replicas:") for p in problems)
    assert any(p.startswith("$.deployments[1].workload:") for p in problems)
    assert len(problems) == 4  # d is declared twice, but only one `d` decoded


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(FleetError, match=r"\$\.models: the name 'a' is declared twice"):
        decode_fleet("models: [{name: a, versions: [{version: v1}]}, {name: a, versions: [{version: v2}]}]")


def test_not_yaml_or_not_a_mapping_is_a_clear_error() -> None:
    with pytest.raises(FleetError, match="not valid YAML"):
        decode_fleet("models: [")
    with pytest.raises(FleetError, match="must be a mapping"):
        decode_fleet("- a\n- b\n")


def test_unreadable_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FleetError, match="cannot read"):
        load_fleet(tmp_path / "missing.yaml")


def test_unversioned_bundle_entries_pin_the_files_default_or_last_version() -> None:
    state = to_records(parse_fleet(TWO_VERSIONS))
    assert state.models["chat"].default_version == "v2"  # no default declared: the last version
    assert state.deployments["canary"].models[0].version == "v2"
    pinned = to_records(parse_fleet(TWO_VERSIONS.replace("    versions:\n", "    default_version: v1\n    versions:\n", 1)))
    assert pinned.deployments["canary"].models[0].version == "v1"


def test_reapplying_keeps_a_rollout_and_api_added_versions() -> None:
    """default_version and traffic left out of the file keep the registry's values, and
    versions added through the API stay: applying the file from git never undoes a rollout."""
    fleet = parse_fleet(TWO_VERSIONS.replace("    versions:\n", "    default_version: v1\n    versions:\n", 1))
    current = to_records(fleet)
    chat = rollout(current.models["chat"], "v2", 10.0, now=5.0)
    chat = add_version(chat, registry.ModelVersionRecord(version="v3", catalog="llama-3.1-8b"), now=6.0)
    current.models["chat"] = chat
    again = desired_state(fleet, current, prune=False, now=9.0)
    assert again == current  # nothing to write

    without_default = parse_fleet(TWO_VERSIONS)  # the file no longer pins v1 as default
    promoted = current.copy()
    promoted.models["chat"] = structs.replace(chat, default_version="v1", traffic={})
    assert desired_state(without_default, promoted, prune=False, now=9.0).models["chat"].default_version == "v1"

    pruned = desired_state(fleet, current, prune=True, now=9.0)
    assert [v.version for v in pruned.models["chat"].versions] == ["v1", "v2"]


def test_declared_traffic_and_default_win_and_bump_updated_at() -> None:
    text = TWO_VERSIONS.replace("    versions:\n", "    default_version: v1\n    traffic: {v1: 50, v2: 50}\n    versions:\n", 1)
    fleet = parse_fleet(text.replace("models: [{model: chat}]", "models: [{model: chat, version: v2}]"))
    current = to_records(parse_fleet(TWO_VERSIONS))
    desired = desired_state(fleet, current, prune=False, now=42.0)
    assert desired.models["chat"].default_version == "v1" and desired.models["chat"].traffic == {"v1": 50.0, "v2": 50.0}
    assert desired.models["chat"].updated_at == 42.0 and desired.models["chat"].created_at == 0.0


def test_deployments_not_in_the_file_follow_their_changed_bundle_template() -> None:
    current = to_records(parse_fleet(TWO_VERSIONS))
    current.deployments["extra"] = structs.replace(current.deployments["stable"], name="extra")
    changed = parse_fleet(TWO_VERSIONS.replace("models: [{model: chat, version: v1}]", "models: [{model: chat, version: v1, config: ss4096-bs4}]"))
    desired = desired_state(changed, current, prune=False, now=1.0)
    assert desired.deployments["extra"].models[0].config == "ss4096-bs4"
    assert desired.deployments["stable"].models[0].config == "ss4096-bs4"
    assert "extra" not in desired_state(changed, current, prune=True, now=1.0).deployments
