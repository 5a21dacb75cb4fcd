"""Hardware profiles, the model catalog and deployment configs: data in, clear errors out."""

from __future__ import annotations

import math

import msgspec
import pytest

from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    DeploymentConfig,
    HardwareProfile,
    ModelSpec,
    load_catalog,
    load_profiles,
    model_from_dict,
    profile_from_dict,
)
from tierflow.rdu.hardware import GiB

# -- hardware -------------------------------------------------------------------------


def test_builtin_profiles_carry_the_published_sn40l_figures() -> None:
    p = BUILTIN_PROFILES["sn40l-16"]
    assert p.sockets == 16
    assert p.sram_bytes == 520 * 2**20
    assert p.hbm_bytes == 64 * GiB
    assert p.ddr_bytes == 1536 * GiB
    assert p.hbm_bw == pytest.approx(1.8e12)
    assert p.ddr_bw == pytest.approx(100e9)  # Hot Chips 2024: 1,600 GB/s over 16 sockets
    assert BUILTIN_PROFILES["sn40l-8"].ddr_bw == pytest.approx(200e9)  # the paper's Tab. II
    assert p.flops == pytest.approx(638e12)
    assert p.switch_bw == pytest.approx(1.6e12)  # DDR-bound: 16 x 100 GB/s
    assert BUILTIN_PROFILES["sn40l-8"].switch_bw == pytest.approx(1e12)  # ">1 TB/s", DMA-bound


def test_h100_switches_over_the_host_link() -> None:
    h = BUILTIN_PROFILES["h100-8x"]
    assert (h.sockets, h.hbm_bytes, h.hbm_bw, h.flops) == (8, 80 * 10**9, 3.35e12, 989e12)
    assert h.weights_path == "host_link"
    assert h.switch_bw == pytest.approx(64e9)


def test_all_builtin_profiles_exist() -> None:
    assert {"sn40l-8", "sn40l-16", "sn50-16", "h100-8x", "a100-8x", "zero"} <= set(
        BUILTIN_PROFILES
    )
    zero = BUILTIN_PROFILES["zero"]
    assert math.isinf(zero.switch_bw) and zero.layer_overhead_s == 0


def test_profile_from_dict_round_trips_and_can_base_on_a_builtin() -> None:
    src = msgspec.to_builtins(BUILTIN_PROFILES["sn40l-16"])
    assert profile_from_dict(src) == BUILTIN_PROFILES["sn40l-16"]
    profiles = load_profiles(
        {"half": {"base": "sn40l-16", "sockets": 8}, "half-fast": {"base": "half", "hbm_bw": 2e12}}
    )
    assert profiles["half"].sockets == 8 and profiles["half"].name == "half"
    assert profiles["half-fast"].sockets == 8 and profiles["half-fast"].hbm_bw == 2e12
    assert isinstance(profiles["sn40l-16"], HardwareProfile)


@pytest.mark.parametrize(
    ("fields", "field_in_message"),
    [
        ({"base": "sn40l-16", "sockets": 0}, "sockets"),
        ({"base": "sn40l-16", "hbm_bw": "fast"}, "hbm_bw"),
        ({"base": "sn40l-16", "hbm_efficiency": 1.5}, "hbm_efficiency"),
        ({"base": "sn40l-16", "sokets": 8}, "sokets"),
        ({"base": "nope"}, "base"),
        ({"sockets": 4}, "sram_bytes"),  # missing required fields are named
    ],
)
def test_bad_profiles_name_the_field(fields: dict, field_in_message: str) -> None:
    with pytest.raises(ValueError, match=field_in_message):
        load_profiles({"custom": fields})


# -- catalog --------------------------------------------------------------------------


def test_catalog_architecture_numbers() -> None:
    m = BUILTIN_MODELS
    assert m["llama-3.1-8b"].kv_bytes_per_token == 32 * 8 * 128 * 2 * 2  # 128 KiB
    assert m["llama-3.1-70b"].num_layers == 80 and m["llama-3.1-405b"].num_layers == 126
    assert m["llama-3.1-405b"].weight_bytes == pytest.approx(811.7e9, rel=1e-3)
    r1 = m["deepseek-r1"]
    assert (r1.total_params, r1.active_params, r1.bytes_per_param) == (671e9, 37e9, 1.0)
    # MLA caches a 576-wide latent per layer: far less than 128 heads of K and V would.
    assert r1.kv_bytes_per_token == 61 * 576 * 2
    assert r1.kv_bytes_per_token < 61 * 128 * 128 * 2 * 2 / 10
    oss = m["gpt-oss-120b"]
    assert oss.bytes_per_param == pytest.approx(0.53, abs=0.01)
    assert oss.weight_bytes / 2**30 == pytest.approx(60.8, rel=0.02)  # the checkpoint: 60.8 GiB
    assert {
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.1-405b",
        "deepseek-r1",
        "deepseek-v3",
        "gpt-oss-120b",
        "gpt-oss-20b",
    } <= set(m)


def test_moe_routed_params_reproduce_active_params() -> None:
    for spec in BUILTIN_MODELS.values():
        if spec.is_moe:
            shared = (
                spec.active_params - spec.routed_params * spec.experts_per_token / spec.num_experts
            )
            assert 0 < shared < spec.active_params


def test_bring_your_own_checkpoint() -> None:
    catalog = load_catalog(
        {
            "my-7b": {
                "total_params": 7_000_000_000,
                "num_layers": 32,
                "hidden_size": 4096,
                "num_heads": 32,
                "num_kv_heads": 8,
                "head_dim": 128,
                "max_context": 32768,
                "dtype": "fp8",
                "draft": "llama-3.2-1b",
            },
            "my-moe": {
                "total_params": 30_000_000_000,
                "active_params": 3_000_000_000,
                "num_layers": 48,
                "hidden_size": 2048,
                "num_heads": 32,
                "num_kv_heads": 4,
                "head_dim": 128,
                "max_context": 32768,
                "num_experts": 128,
                "experts_per_token": 8,
            },
        }
    )
    mine = catalog["my-7b"]
    assert mine.bytes_per_param == 1.0 and mine.kv_bytes_per_token == 32 * 8 * 128 * 4
    assert mine.draft == BUILTIN_MODELS["llama-3.2-1b"]
    assert catalog["my-moe"].moe_layers == 48
    assert msgspec.convert(msgspec.to_builtins(mine), ModelSpec) == mine


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"total_params": 10, "active_params": 20}, "active_params"),
        ({"total_params": -1}, "total_params"),
        ({"total_params": 10, "dtype": "fp6"}, "dtype"),
        ({"total_params": 10, "draft": "missing-model"}, "draft"),
        ({"total_params": 10, "num_experts": 8, "experts_per_token": 9}, "experts_per_token"),
        ({"total_params": 10, "nmu_layers": 3}, "nmu_layers"),
    ],
)
def test_bad_models_name_the_field(fields: dict, message: str) -> None:
    base = {
        "num_layers": 2,
        "hidden_size": 8,
        "num_heads": 2,
        "num_kv_heads": 1,
        "head_dim": 4,
        "max_context": 64,
    }
    with pytest.raises(ValueError, match=message) as info:
        model_from_dict({**base, **fields}, name="custom")
    assert "custom" in str(info.value)


# -- deployment configs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "seq_len", "batch"),
    [("ss8192-bs4", 8192, 4), ("ss16384-bs1-cb2-128", 16384, 128), ("ss4096-bs1", 4096, 1)],
)
def test_deployment_names_parse_and_round_trip(name: str, seq_len: int, batch: int) -> None:
    cfg = DeploymentConfig.parse(name)
    assert (cfg.seq_len, cfg.batch_size) == (seq_len, batch)
    assert str(cfg) == cfg.name == name
    assert DeploymentConfig.parse(str(cfg)) == cfg


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ss8192",
        "bs4-ss8192",
        "ss0-bs4",
        "ss8192-bs0",
        "ss8192-bs4-cb8-2",
        "ss8192-bs8-cb2-4",
        "ss8192-bs4-cb0-4",
        "ss8k-bs4",
        "ss8192-bs4 extra",
    ],
)
def test_malformed_deployment_names_explain_the_format(bad: str) -> None:
    with pytest.raises(ValueError, match=r"ss8192-bs4|cb|>= 1|1 <= min") as info:
        DeploymentConfig.parse(bad)
    assert repr(bad) in str(info.value)
