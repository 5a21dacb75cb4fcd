"""The pieces under the state machine: config validation, signals, victim choice, rolling p95."""

from __future__ import annotations

import msgspec
import pytest

from tierflow.scaling import (
    NodeLoad,
    PoolBounds,
    PoolSnapshot,
    RollingQuantile,
    ScalingConfig,
    choose_victims,
    evaluate,
    quantile,
    signals_for,
)
from tierflow.scaling.signals import itl, prompt_tokens, queue, ttft, utilization


# -- config ---------------------------------------------------------------------------
def test_config_errors_name_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"target_utilization"):
        msgspec.convert({"target_utilization": 1.5}, ScalingConfig)
    with pytest.raises(msgspec.ValidationError, match=r"max_step_down"):
        msgspec.convert({"max_step_down": 0}, ScalingConfig)


def test_panic_window_longer_than_stable_window_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"panic_window \(400s\) must not exceed stable_window \(300s\)"):
        msgspec.convert({"panic_window": 400}, ScalingConfig)
    with pytest.raises(ValueError, match="panic_window"):
        ScalingConfig(panic_window=10, stable_window=5)


def test_bounds_are_checked_and_clamp() -> None:
    with pytest.raises(ValueError, match=r"min_replicas \(3\) exceeds max_replicas \(2\)"):
        PoolBounds(min_replicas=3, max_replicas=2)
    b = PoolBounds(min_replicas=1, max_replicas=3)
    assert [b.clamp(n) for n in (0, 2, 9)] == [1, 2, 3]


def test_service_settings_carry_every_policy_field_with_the_same_default() -> None:
    from tierflow.services.autoscaler.settings import Settings

    policy = {f.name: f.default for f in msgspec.structs.fields(ScalingConfig)}
    shell = {f.name: f.default for f in msgspec.structs.fields(Settings)}
    assert {k: shell.get(k) for k in policy} == policy
    assert Settings().scaling() == ScalingConfig()


# -- signals --------------------------------------------------------------------------
C = ScalingConfig(target_utilization=0.5, target_queue_per_replica=2.0, target_prompt_tokens_per_replica=1000,
                  ttft_slo=1.0, itl_slo=0.1, latency_headroom=0.8)  # fmt: skip


def test_utilization_sizes_for_the_target() -> None:
    s = PoolSnapshot(ready=2, running=8, waiting=0, batch_slots=8, signal_age=0)
    a = utilization(s, C)
    assert a is not None and (a.replicas, a.value, a.target) == (4, 1.0, 0.5)  # 8 requests / (4 slots * 0.5)
    assert utilization(PoolSnapshot(ready=2, running=4, waiting=0, batch_slots=8), C).replicas == 2  # exactly on target: no float round-up
    assert utilization(PoolSnapshot(ready=2, running=0, waiting=0, batch_slots=8), C).replicas == 0


def test_queue_and_prompt_tokens() -> None:
    s = PoolSnapshot(ready=1, running=0, waiting=5, batch_slots=4, queued_prompt_tokens=2500)
    assert queue(s, C).replicas == 3
    assert prompt_tokens(s, C).replicas == 3


def test_latency_is_one_sided() -> None:
    def ask(p95: float) -> int:
        a = ttft(PoolSnapshot(ready=3, ttft_p95=p95), C)
        assert a is not None
        return a.replicas

    assert ask(2.0) == 6  # twice the SLO: twice the replicas
    assert ask(1.01) == 4  # just over: at least one more
    assert ask(0.9) == 3  # near the SLO: hold what there is
    assert ask(0.1) == 0  # far below: asks for nothing (latency says nothing about fewer)
    assert itl(PoolSnapshot(ready=3, itl_p95=0.3), C).replicas == 9


@pytest.mark.parametrize("snapshot", [PoolSnapshot(), PoolSnapshot(ready=0, running=3, waiting=3, batch_slots=4), PoolSnapshot(ready=2)])
def test_unknown_inputs_abstain(snapshot: PoolSnapshot) -> None:
    assert evaluate("aggregated", "decode", snapshot, C) == []


def test_a_latency_slo_of_zero_turns_the_signal_off() -> None:
    off = ScalingConfig(ttft_slo=0.0)
    assert ttft(PoolSnapshot(ready=1, ttft_p95=100.0), off) is None


def test_signals_per_pool() -> None:
    assert signals_for("aggregated", "decode") == ("utilization", "queue", "ttft", "itl")
    assert signals_for("disaggregated", "prefill") == ("ttft", "prompt_tokens", "queue")
    assert signals_for("disaggregated", "decode") == ("utilization", "itl")
    with pytest.raises(ValueError, match="prefill"):
        signals_for("aggregated", "prefill")


# -- victims --------------------------------------------------------------------------
def test_victim_is_the_node_with_least_in_flight_not_the_newest() -> None:
    nodes = [
        NodeLoad(node_id="old-busy", in_flight=5, started_at=1.0),
        NodeLoad(node_id="new-hot", in_flight=3, prefix_cache_blocks=900, hot_models=2, started_at=9.0),
        NodeLoad(node_id="mid-idle", in_flight=0, prefix_cache_blocks=50, started_at=5.0),
    ]
    assert choose_victims(nodes, 1) == ["mid-idle"]
    assert choose_victims(nodes, 2) == ["mid-idle", "new-hot"]


def test_equal_load_gives_back_the_coldest_then_the_newest() -> None:
    nodes = [
        NodeLoad(node_id="a", in_flight=1, prefix_cache_blocks=500, started_at=1.0),
        NodeLoad(node_id="b", in_flight=1, prefix_cache_blocks=20, started_at=2.0),
        NodeLoad(node_id="c", in_flight=1, prefix_cache_blocks=20, started_at=3.0),
    ]
    assert choose_victims(nodes, 3) == ["c", "b", "a"]


def test_cordoned_nodes_are_never_victims() -> None:
    nodes = [NodeLoad(node_id="ops-cordoned", cordoned=True), NodeLoad(node_id="busy", in_flight=9)]
    assert choose_victims(nodes, 2) == ["busy"]
    assert choose_victims(nodes, 0) == []


# -- rolling p95 ----------------------------------------------------------------------
def test_rolling_quantile_forgets_old_samples() -> None:
    w = RollingQuantile(window=10.0)
    assert w.value(0.0) is None  # no traffic is not zero latency
    for i in range(100):
        w.observe(float(i) / 10, float(i))  # values 0..99 over 10 s
    assert w.value(9.9) == 94.0
    assert w.count(9.9) == 100
    assert w.value(15.0) == 97.0  # samples older than 5.0 s are gone: 50..99 remain (rank 48 of 50)
    assert w.count(15.0) == 50
    assert w.value(30.0) is None


def test_rolling_quantile_keeps_the_newest_when_full() -> None:
    w = RollingQuantile(window=100.0, max_samples=10)
    for i in range(50):
        w.observe(float(i), float(i))
    assert w.count(50.0) == 10 and w.value(50.0, 0.0) == 40.0


def test_quantile_nearest_rank() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0] * 19 + [100.0], 0.95) == 1.0
    assert quantile([1.0] * 18 + [100.0] * 2, 0.95) == 100.0
    with pytest.raises(ValueError):
        quantile([], 0.5)
