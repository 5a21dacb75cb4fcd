"""The timing model: physics that must hold, and the calibration against public figures."""

from __future__ import annotations

import msgspec
import pytest

from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES
from tierflow.rdu.calibrate import (
    DECODE_FIGURES,
    FITTED_FIELDS,
    TOLERANCE,
    calibration_rows,
    fit_objective,
    fit_parameters,
)
from tierflow.rdu.timing import (
    CALIBRATION_CONTEXT,
    DecodeCostModel,
    cold_load_time,
    decode_step_time,
    decode_tokens_per_second,
    forward_time,
    kv_transfer_time,
    prefill_time,
    resident_bytes,
    spec_plan,
    switch_time,
    weights_read_bytes,
)

SN40L = BUILTIN_PROFILES["sn40l-16"]
H100 = BUILTIN_PROFILES["h100-8x"]
ZERO = BUILTIN_PROFILES["zero"]
M8B, M70B, M405B = (BUILTIN_MODELS[n] for n in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"))
R1, OSS = BUILTIN_MODELS["deepseek-r1"], BUILTIN_MODELS["gpt-oss-120b"]


def test_every_published_figure_is_within_tolerance() -> None:
    rows = calibration_rows()
    assert len(rows) == len(DECODE_FIGURES) + 2
    for row in rows:
        assert row.within_tolerance, row
        assert abs(row.relative_error) <= TOLERANCE


def test_the_baked_parameters_are_the_fit() -> None:
    """hardware.py's SN40L numbers are what fit_parameters() finds (to their rounding)."""
    fit = fit_parameters()
    for field in FITTED_FIELDS:
        assert getattr(SN40L, field) == pytest.approx(fit[field], rel=0.01), field
    refit = msgspec.structs.replace(SN40L, **fit)
    assert fit_objective(SN40L) <= fit_objective(refit) * 1.01 + 1e-6


def test_switching_an_8b_model_takes_tens_of_ms_on_16_sockets() -> None:
    t = switch_time(M8B, SN40L)
    assert 0.010 < t < 0.050
    assert switch_time(M8B, BUILTIN_PROFILES["sn40l-8"]) == pytest.approx(2 * t)
    # the published comparison: ~15x a DGX H100 loading over ~64 GB/s PCIe
    assert switch_time(M8B, H100) / t == pytest.approx(15, rel=TOLERANCE)


def test_cold_load_pays_storage_then_the_copy() -> None:
    assert cold_load_time(M70B, SN40L) == pytest.approx(
        resident_bytes(M70B, SN40L) / SN40L.storage_bw + switch_time(M70B, SN40L)
    )
    assert cold_load_time(M70B, SN40L) > 10 * switch_time(M70B, SN40L)


def test_resident_bytes_include_the_draft_only_when_speculating() -> None:
    assert resident_bytes(M70B, SN40L) == M70B.weight_bytes + M70B.draft.weight_bytes  # type: ignore[union-attr]
    assert resident_bytes(M70B, H100) == M70B.weight_bytes  # H100 profile: no spec decode
    assert resident_bytes(M8B, SN40L) == M8B.weight_bytes  # no draft


def test_decode_is_memory_bound_and_a_batch_reads_the_weights_once() -> None:
    one = forward_time(M70B, H100, batch=1, context_tokens=1024)
    eight = forward_time(M70B, H100, batch=8, context_tokens=8 * 1024)
    assert eight < 1.2 * one  # 8x the tokens for a fraction more time
    assert decode_step_time(M70B, H100, batch=8, context_tokens=8192) < 1.2 * decode_step_time(
        M70B, H100
    )


def test_kv_reads_grow_decode_time_with_context() -> None:
    short = decode_step_time(M8B, SN40L, batch=32, context_tokens=32 * 100)
    long = decode_step_time(M8B, SN40L, batch=32, context_tokens=32 * 8000)
    assert long > 1.5 * short


def test_large_batches_become_compute_bound() -> None:
    small = forward_time(M8B, SN40L, batch=1)
    huge = forward_time(M8B, SN40L, batch=4096)
    assert huge > 5 * small


def test_moe_batches_touch_more_experts() -> None:
    assert weights_read_bytes(R1, 1) == pytest.approx(R1.active_params * R1.bytes_per_param)
    assert weights_read_bytes(R1, 8) > 4 * weights_read_bytes(R1, 1)
    assert weights_read_bytes(R1, 100_000) == pytest.approx(R1.weight_bytes, rel=1e-3)
    assert weights_read_bytes(M8B, 100) == M8B.weight_bytes


def test_speculative_decoding_where_published_and_not_at_large_batch() -> None:
    assert spec_plan(M70B, SN40L, context_tokens=CALIBRATION_CONTEXT).draft_tokens > 0
    assert spec_plan(M405B, SN40L, context_tokens=CALIBRATION_CONTEXT).draft_tokens > 0
    assert spec_plan(M8B, SN40L).draft_tokens == 0  # no draft in its published configuration
    assert spec_plan(M70B, H100).draft_tokens == 0  # profile without spec decode
    # compute-bound: verifying k extra tokens per sequence costs more than it yields
    assert spec_plan(M70B, SN40L, batch=1024, context_tokens=1024 * 128).draft_tokens == 0


def test_prefill_is_compute_bound_and_prefix_hits_skip_work() -> None:
    cold = prefill_time(M70B, SN40L, [(4096, 0)])
    warm = prefill_time(M70B, SN40L, [(96, 4000)])
    assert cold > 10 * warm  # the warm pass is bound by one read of the weights
    flops = 2 * M70B.active_params * 4096 / (SN40L.node_flops * SN40L.compute_efficiency)
    assert cold > flops
    assert prefill_time(M70B, SN40L, []) == 0.0


def test_decode_cost_model_matches_the_functions() -> None:
    for spec in (M8B, M70B, OSS):
        model = DecodeCostModel(spec, SN40L)
        for batch in (1, 4, 32):
            ctx = batch * CALIBRATION_CONTEXT
            assert model.step_seconds(batch, ctx) == pytest.approx(
                decode_step_time(spec, SN40L, batch=batch, context_tokens=ctx)
            )


def test_zero_profile_takes_no_time() -> None:
    assert switch_time(M405B, ZERO) == 0.0
    assert cold_load_time(M405B, ZERO) == 0.0
    assert decode_step_time(R1, ZERO, batch=64, context_tokens=10**6) == 0.0
    assert prefill_time(M70B, ZERO, [(8000, 0)]) == 0.0
    assert kv_transfer_time(M70B, ZERO, 8000) == 0.0


def test_kv_transfer_uses_the_internode_link() -> None:
    assert kv_transfer_time(M70B, SN40L, 1000) == pytest.approx(
        1000 * M70B.kv_bytes_per_token / SN40L.internode_bw
    )


def test_single_user_speed_is_the_inverse_step() -> None:
    assert decode_tokens_per_second(M8B, SN40L) == pytest.approx(
        1 / decode_step_time(M8B, SN40L, context_tokens=CALIBRATION_CONTEXT)
    )


def test_a_per_step_overhead_fitted_as_a_fifth_parameter_goes_to_zero() -> None:
    """Why SN40L pins step_overhead_s at 0 and counts four free parameters, not five."""
    fit = fit_parameters(fields=(*FITTED_FIELDS, "step_overhead_s"))
    assert fit["step_overhead_s"] < 1e-6  # under a microsecond per pass
    assert fit["hbm_efficiency"] == pytest.approx(SN40L.hbm_efficiency, rel=0.01)
