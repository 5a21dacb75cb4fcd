"""The registry's rules, one test each, on the pure validation (`rules.check_state` through
`fleet.check_fleet`, which points every problem at the file)."""

from __future__ import annotations

import pathlib

import pytest
from msgspec import structs

from tierflow.services.model_registry.fleet import check_fleet, decode_fleet, to_records
from tierflow.services.model_registry.main import rule_context
from tierflow.services.model_registry.rules import RegistryLocator, RuleContext, check_state, format_problems, new_problems

CTX = RuleContext.builtin()


def fleet(*, config: str = "ss8192-bs4", workload: str = "bundle", extra_model: bool = False, deployment: str = "replicas: 1", configs: str = "", version: str = "catalog: llama-3.1-8b") -> str:
    """One model (optionally two) in one bundle, one deployment of it."""
    second = "\n  - {name: coder, versions: [{version: v1, catalog: gpt-oss-20b}]}" if extra_model else ""
    entries = f"[{{model: chat, config: {config}}}" + (", {model: coder}]" if extra_model else "]")
    return f"""
models:
  - {{name: chat, versions: [{{version: v1, {version}{configs}}}]}}{second}
bundles:
  - {{name: b, models: {entries}}}
deployments:
  - {{name: d, bundle: b, workload: {workload}, {deployment}}}
"""


def problems(text: str) -> list[str]:
    return check_fleet(decode_fleet(text), CTX)


def only(text: str, path: str) -> str:
    found = problems(text)
    assert len(found) == 1 and found[0].startswith(path + ": "), found
    return found[0]


def test_a_plain_bundle_is_fine() -> None:
    assert problems(fleet(extra_model=True, deployment="replicas: 2, max_replicas: 4")) == []


def test_high_interactivity_is_dedicated() -> None:
    message = only(fleet(workload="high-interactivity", extra_model=True), "$.deployments[0].workload")
    assert "dedicated" in message and "holds 2 (chat, coder)" in message


def test_high_throughput_is_dedicated() -> None:
    text = fleet(workload="high-throughput", extra_model=True, config="ss8192-bs8-cb8-128", deployment="replicas: 4, min_replicas: 4, max_replicas: 4")
    text = text.replace("{model: coder}", "{model: coder, config: ss8192-bs8-cb8-128}")
    assert "dedicated" in only(text, "$.deployments[0].workload")


def test_high_interactivity_needs_batch_of_at_most_4() -> None:
    assert problems(fleet(workload="high-interactivity", config="ss8192-bs4")) == []
    message = only(fleet(workload="high-interactivity", config="ss8192-bs8"), "$.deployments[0].workload")
    assert "batch size <= 4" in message and "(batch 8)" in message


def test_high_throughput_needs_continuous_batching_of_at_least_64() -> None:
    nodes = "replicas: 4, min_replicas: 4, max_replicas: 8"
    assert problems(fleet(workload="high-throughput", config="ss8192-bs8-cb8-128", deployment=nodes)) == []
    assert "a static batch of 64" in only(fleet(workload="high-throughput", config="ss8192-bs64", deployment=nodes), "$.deployments[0].workload")
    assert "continuous batching up to 32" in only(fleet(workload="high-throughput", config="ss8192-bs1-cb2-32", deployment=nodes), "$.deployments[0].workload")


def test_high_throughput_needs_at_least_4_nodes() -> None:
    message = only(fleet(workload="high-throughput", config="ss8192-bs8-cb8-128", deployment="replicas: 3, max_replicas: 3"), "$.deployments[0].replicas")
    assert "at least 4 nodes" in message and "is 3" in message


def test_high_throughput_min_replicas_must_keep_4_nodes() -> None:
    message = only(fleet(workload="high-throughput", config="ss8192-bs8-cb8-128", deployment="replicas: 4, min_replicas: 1, max_replicas: 8"), "$.deployments[0].min_replicas")
    assert "raise min_replicas to at least 4" in message


def test_disaggregated_needs_more_prefill_than_decode_nodes() -> None:
    base = dict(workload="high-throughput", config="ss8192-bs8-cb8-128")
    assert problems(fleet(**base, deployment="replicas: 1, min_replicas: 1, mode: disaggregated, prefill_replicas: 3")) == []
    message = only(fleet(**base, deployment="replicas: 2, min_replicas: 2, max_replicas: 2, mode: disaggregated, prefill_replicas: 2"), "$.deployments[0].prefill_replicas")
    assert "more prefill than decode" in message and "at least 3" in message


def test_disaggregated_is_for_high_throughput_only() -> None:
    message = only(fleet(deployment="replicas: 1, mode: disaggregated, prefill_replicas: 3"), "$.deployments[0].mode")
    assert "for high-throughput" in message


def test_prefill_replicas_need_disaggregated_mode() -> None:
    assert "only applies to mode: disaggregated" in only(fleet(deployment="replicas: 1, prefill_replicas: 2"), "$.deployments[0].prefill_replicas")


def test_a_config_must_exist_for_the_checkpoint_version() -> None:
    assert problems(fleet(config="ss8192-bs4", configs=", configs: [ss8192-bs4, ss4096-bs1]")) == []
    message = only(fleet(config="ss16384-bs4", configs=", configs: [ss8192-bs4, ss4096-bs1]"), "$.bundles[0].models[0].config")
    assert "not a configuration version 'v1' of 'chat' exists in" in message and "ss8192-bs4, ss4096-bs1" in message


def test_without_declared_configs_a_config_must_parse_and_fit_the_context() -> None:
    assert "malformed deployment config" in only(fleet(config="fast"), "$.bundles[0].models[0].config")
    assert "maximum context of 131072" in only(fleet(config="ss200000-bs1"), "$.bundles[0].models[0].config")


def test_declared_configs_must_parse_and_fit() -> None:
    found = problems(fleet(configs=", configs: [ss8192-bs4, nope, ss999999-bs1]"))
    assert [p.split(":")[0] for p in found] == ["$.models[0].versions[0].configs[1]", "$.models[0].versions[0].configs[2]"]


def test_the_catalog_entry_must_exist() -> None:
    assert "the emulator does not know" in only(fleet(version="catalog: llama-9"), "$.models[0].versions[0].catalog")


def test_a_bring_your_own_spec_is_checked_like_the_node_builds_it() -> None:
    spec = "spec: {total_params: 1000000000, num_layers: 16, hidden_size: 2048, num_heads: 32, num_kv_heads: 8, head_dim: 64, max_context: 8192}"
    assert problems(fleet(version=spec)) == []
    assert "maximum context of 8192" in only(fleet(version=spec, config="ss16384-bs4"), "$.bundles[0].models[0].config")
    assert "missing: num_layers" in only(fleet(version="spec: {total_params: 10}"), "$.models[0].versions[0].spec")
    assert "not both" in only(fleet(version=f"catalog: llama-3.1-8b, {spec}"), "$.models[0].versions[0]")


def test_the_hardware_profile_must_exist() -> None:
    assert "hardware profile 'tpu-v9' is unknown" in only(fleet(deployment="replicas: 1, profile: tpu-v9"), "$.deployments[0].profile")


def test_a_model_is_bundled_once() -> None:
    text = fleet().replace("models: [{model: chat, config: ss8192-bs4}]", "models: [{model: chat}, {model: chat}]")
    assert "bundled twice" in only(text, "$.bundles[0].models")


def test_traffic_only_goes_to_served_versions() -> None:
    text = fleet().replace("[{version: v1, catalog: llama-3.1-8b}]", "[{version: v1, catalog: llama-3.1-8b}, {version: v2, catalog: llama-3.1-8b}], default_version: v1, traffic: {v1: 90, v2: 10}")
    message = only(text, "$.models[0].traffic")
    assert "'v2' would get 10% of the traffic but no deployment serves it" in message


def test_every_problem_is_listed_at_once() -> None:
    text = fleet(workload="high-throughput", extra_model=True, config="ss8192-bs4", deployment="replicas: 1, profile: nope, mode: disaggregated")
    paths = {p.split(": ")[0] for p in problems(text)}
    assert paths == {"$.deployments[0].workload", "$.deployments[0].replicas", "$.deployments[0].profile", "$.deployments[0].prefill_replicas"}


def test_a_change_is_refused_only_for_the_problems_it_adds() -> None:
    state = to_records(decode_fleet(fleet()))
    broken = state.copy()
    broken.deployments["d"] = structs.replace(state.deployments["d"], profile="gone")  # e.g. a profile removed by an upgrade
    assert new_problems(state, broken, CTX) and not new_problems(broken, broken, CTX)
    worse = broken.copy()
    worse.deployments["d"] = structs.replace(broken.deployments["d"], prefill_replicas=1)
    (added,) = new_problems(broken, worse, CTX)
    assert format_problems([added], RegistryLocator())[0].startswith("registry:deployment/d.prefill_replicas: ")


@pytest.mark.parametrize("name", ["a:b", "a b"])
def test_model_names_must_be_usable_as_kv_keys(name: str) -> None:
    state = to_records(decode_fleet(fleet()))
    state.models["chat"] = structs.replace(state.models["chat"], name=name)
    assert any(p.field == ".name" for p in check_state(state, CTX))


def test_user_hardware_profiles_given_to_the_registry_pass(tmp_path: pathlib.Path) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("sn40l-16-slow-storage:\n  base: sn40l-16\n  storage_bw: 5.0e+9\n")
    text = fleet(deployment="replicas: 1, profile: sn40l-16-slow-storage")
    assert check_fleet(decode_fleet(text), rule_context(str(profiles))) == []
    assert "unknown" in only(text, "$.deployments[0].profile")
    with pytest.raises(ValueError, match="cannot read hardware profiles file"):
        rule_context(str(tmp_path / "missing.yaml"))


def test_a_bundle_must_fit_its_hardware() -> None:
    """The engine a node would build decides: 405B weights do not fit sn40l-8's HBM (every
    node would crash at start), while three large models share sn40l-16 through DDR."""
    too_big = fleet(version="catalog: llama-3.1-405b", deployment="replicas: 1, profile: sn40l-8")
    message = only(too_big, "$.deployments[0].profile")
    assert "bundle 'b' does not fit on 'sn40l-8'" in message and "needs 814.2 GB of HBM for weights" in message
    assert problems(fleet(version="catalog: llama-3.1-405b", deployment="replicas: 1, profile: sn40l-16")) == []
