"""The timing model: physics that must hold, and the calibration against public figures."""

from __future__ import annotations

import msgspec
import pytest

from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES
from tierflow.rdu.calibrate import (
    FIT_TOLERANCE,
    FITTED_FIELDS,
    FITTED_PROFILES,
    TOLERANCE,
    calibration_rows,
    fit_objective,
    fit_parameters,
)
from tierflow.rdu.figures import FIGURES
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
    switch_then_prefill_time,
    switch_time,
    weights_read_bytes,
)

SN40L = BUILTIN_PROFILES["sn40l-16"]
H100 = BUILTIN_PROFILES["h100-8x"]
ZERO = BUILTIN_PROFILES["zero"]
M8B, M70B, M405B = (BUILTIN_MODELS[n] for n in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"))
R1, OSS = BUILTIN_MODELS["deepseek-r1"], BUILTIN_MODELS["gpt-oss-120b"]


# Figures the cited sources cannot meet honestly: the two 8-socket TTFTs have the same
# FLOPs (Llama-3-8B and Mistral-7B multiply ~6.98B parameters a token) but were measured
# 19% apart, so each predicts the other 16-19% off. Change this only with a new figure.
KNOWN_LOO_MISSES = {"ttft llama-3.1-8b bs16 1024 (8 sockets)", "ttft mistral-7b bs16 1024 (8 sockets)"}


def test_every_figure_is_within_tolerance_fitted_and_left_out() -> None:
    rows = calibration_rows()
    assert len(rows) == len(FIGURES)
    fitted = [r for r in rows if r.in_fit]
    assert len(fitted) > 2 * len(FITTED_FIELDS)  # far more figures than free constants
    for row in rows:
        if not row.gated:
            continue
        assert abs(row.error) <= (FIT_TOLERANCE if row.in_fit else TOLERANCE), row
        if row.figure in KNOWN_LOO_MISSES:
            assert TOLERANCE < abs(row.loo_error) < 0.25, row
        else:
            assert abs(row.loo_error) <= TOLERANCE, row
            assert row.within_tolerance, row


def test_the_baked_parameters_are_the_fit() -> None:
    """hardware.py's SN40L numbers are what fit_parameters() finds (to their rounding)."""
    fit = fit_parameters()
    for field in FITTED_FIELDS:
        for name in FITTED_PROFILES:
            assert getattr(BUILTIN_PROFILES[name], field) == pytest.approx(fit[field], rel=0.03)
    refit = dict(BUILTIN_PROFILES)
    for name in FITTED_PROFILES:
        refit[name] = msgspec.structs.replace(refit[name], **fit)
    assert fit_objective() <= fit_objective(refit) * 1.01 + 1e-6


def test_switching_follows_ddr_per_socket_and_the_host_link() -> None:
    t = switch_time(M8B, SN40L)
    assert t == pytest.approx(M8B.weight_bytes / (16 * SN40L.ddr_bw))  # DDR-bound on 16
    eight = BUILTIN_PROFILES["sn40l-8"]
    assert eight.switch_bw == pytest.approx(8 * eight.ddr_hbm_bw)  # DMA-bound on 8
    # the paper's comparison: an 8-socket node 15x-31x faster than DGX H100 / A100
    l2 = BUILTIN_MODELS["llama-2-7b"]
    for dgx in ("h100-8x", "a100-8x"):
        ratio = switch_time(l2, BUILTIN_PROFILES[dgx]) / switch_time(l2, eight)
        assert 15 <= ratio <= 31 * (1 + TOLERANCE), dgx


def test_gpt_oss_reads_bf16_attention_and_mxfp4_experts() -> None:
    # ~5 GB a token (model card arithmetic), not active_params x 4.25 bits (2.7 GB)
    assert 4.8e9 < weights_read_bytes(OSS, 1) < 5.2e9
    assert OSS.weight_bytes / 2**30 == pytest.approx(60.8, rel=0.02)  # the checkpoint's GiB


def test_untied_embedding_is_looked_up_not_streamed() -> None:
    assert weights_read_bytes(M8B, 1) == pytest.approx(M8B.weight_bytes - 2 * 128_256 * 4096)
    one_b = BUILTIN_MODELS["llama-3.2-1b"]  # tied: the one table is the unembedding
    assert weights_read_bytes(one_b, 1) == pytest.approx(one_b.weight_bytes)


def test_moe_dispatch_is_charged_per_routed_expert() -> None:
    base = msgspec.structs.replace(SN40L, moe_dispatch_s=0.0)
    extra = forward_time(R1, SN40L) - forward_time(R1, base)
    assert extra == pytest.approx(R1.moe_layers * R1.experts_per_token * SN40L.moe_dispatch_s)


def test_a_switch_overlaps_the_first_prefill() -> None:
    pre = prefill_time(M70B, SN40L, [(4096, 0)])
    both = switch_then_prefill_time(M70B, SN40L, pre)
    assert max(pre, switch_time(M70B, SN40L)) < both < pre + switch_time(M70B, SN40L)


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
    looked_up = R1.lookup_params * R1.bytes_per_param  # the embedding table: never streamed
    assert weights_read_bytes(R1, 1) == pytest.approx(
        R1.active_params * R1.bytes_per_param - looked_up
    )
    assert weights_read_bytes(R1, 8) > 4 * weights_read_bytes(R1, 1)
    assert weights_read_bytes(R1, 100_000) == pytest.approx(R1.weight_bytes - looked_up, rel=1e-3)
    assert weights_read_bytes(M8B, 100) == weights_read_bytes(M8B, 1)


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
    flops = 2 * M70B.matmul_params * 4096 / (SN40L.node_flops * SN40L.compute_efficiency)
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


def test_a_sixth_parameter_buys_little() -> None:
    """Why SN40L pins step_overhead_s at 0 and counts five free parameters, not six: freed,
    a per-pass constant trades places with the per-layer one (the two are nearly
    degenerate across these layer counts) and the fit improves by under a fifth."""
    fit = fit_parameters(fields=(*FITTED_FIELDS, "step_overhead_s"))
    six = dict(BUILTIN_PROFILES)
    for name in FITTED_PROFILES:
        six[name] = msgspec.structs.replace(six[name], **fit)
    assert fit_objective(six) > 0.8 * fit_objective()
