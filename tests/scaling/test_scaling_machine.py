"""The SLO-driven state machine (tierflow.scaling.machine), in pure virtual time.

A small closed loop stands in for the fleet: decisions take effect at once, each replica
has 8 batch slots, and a load is a number of concurrent requests.
"""

from __future__ import annotations

import math

import pytest

from tierflow.scaling import DeploymentSnapshot, PoolBounds, PoolSnapshot, ScalingConfig, tick

SLOTS = 8  # per replica
FAST = ScalingConfig(panic_window=2.0, stable_window=30.0, cooldown_up=0.0, cooldown_down=0.0, max_step_up=10, max_signal_age=5.0)


def pool(ready: int, load: int, *, age: float | None = 0.5, **extra: object) -> PoolSnapshot:
    """`load` concurrent requests spread over `ready` replicas of SLOTS slots each."""
    slots = ready * SLOTS
    fields: dict[str, object] = dict(ready=ready, running=min(load, slots), waiting=max(0, load - slots), batch_slots=slots, signal_age=age)
    if ready == 0:
        fields.update(running=None, waiting=None, batch_slots=None)
    fields.update(extra)
    return PoolSnapshot(**fields)  # type: ignore[arg-type]


def snap(p: PoolSnapshot, *, lo: int = 1, hi: int = 10) -> DeploymentSnapshot:
    return DeploymentSnapshot(deployment="d", pools={"decode": p}, bounds={"decode": PoolBounds(min_replicas=lo, max_replicas=hi)})


def simulate(loads: list[int], *, start: int = 1, config: ScalingConfig = FAST, lo: int = 1, hi: int = 10, dt: float = 1.0) -> list[int]:
    """Replicas after each tick, one tick per `dt` seconds, one load per tick."""
    state, replicas, out = None, start, []
    for i, load in enumerate(loads):
        state, decision = tick(state, snap(pool(replicas, load), lo=lo, hi=hi), i * dt, config)
        replicas = decision.pools[0].desired
        out.append(replicas)
    return out


def changes(series: list[int]) -> int:
    return sum(1 for a, b in zip(series, series[1:]) if a != b)


def test_oscillating_load_does_not_oscillate_replicas() -> None:
    """Load swings between 4 and 40 every 5 s for 3 minutes: replicas go up once and stay."""
    loads = [40 if (t // 5) % 2 else 4 for t in range(180)]
    series = simulate(loads)
    assert changes(series[10:]) == 0, series
    assert series[-1] == math.ceil(40 / (SLOTS * 0.7))  # sized for the peaks


def test_steady_spike_scales_up_within_the_panic_window_and_down_after_the_stable_window() -> None:
    loads = [4] * 40 + [40] * 20 + [4] * 80
    series = simulate(loads)
    need = math.ceil(40 / (SLOTS * 0.7))
    up_at = next(i for i, r in enumerate(series) if r > 1)
    assert 40 <= up_at <= 40 + FAST.panic_window + 1  # waited for the load to hold, not longer
    assert series[up_at] == need
    down_at = next(i for i in range(60, len(series)) if series[i] < need)
    assert down_at >= 60 + FAST.stable_window - 1  # the stable window after the last high ask
    assert series[-1] == 1


def test_a_one_tick_blip_does_not_scale_up() -> None:
    loads = [4] * 20 + [60] + [4] * 20
    assert set(simulate(loads)) == {1}


def test_scale_down_is_one_step_at_a_time_with_cooldown() -> None:
    config = ScalingConfig(panic_window=0.0, stable_window=10.0, cooldown_up=0.0, cooldown_down=5.0, max_step_down=1, max_signal_age=5.0)
    series = simulate([0] * 60, start=5, config=config)
    downs = [i for i, (a, b) in enumerate(zip([5] + series, series)) if b < a]
    assert [series[i] for i in downs] == [4, 3, 2, 1]
    assert all(b - a >= 5 for a, b in zip(downs, downs[1:]))  # cooldown_down between steps
    assert downs[0] >= 10  # a whole stable window observed first


def test_scale_up_respects_max_step_and_cooldown() -> None:
    config = ScalingConfig(panic_window=0.0, stable_window=30.0, cooldown_up=3.0, max_step_up=2, max_signal_age=5.0)
    series = simulate([200] * 16, config=config, hi=10)
    assert series[:4] == [3, 3, 3, 5]
    assert max(series) == 10


@pytest.mark.parametrize(("load", "lo", "hi", "expected"), [(400, 1, 3, 3), (0, 2, 5, 2), (0, 0, 5, 0)])
def test_replicas_stay_within_min_and_max(load: int, lo: int, hi: int, expected: int) -> None:
    series = simulate([load] * 120, start=lo or 1, lo=lo, hi=hi)
    assert all(lo <= r <= hi for r in series)
    assert series[-1] == expected


def test_below_min_scales_up_even_without_any_signal() -> None:
    _, decision = tick(None, snap(PoolSnapshot(), lo=2, hi=4), 0.0, FAST)
    d = decision.pools[0]
    assert (d.action, d.desired, d.signal) == ("up", 2, "bounds")


def test_above_max_scales_down_toward_it() -> None:
    _, decision = tick(None, snap(pool(6, 100), lo=1, hi=4), 0.0, FAST)
    d = decision.pools[0]
    assert (d.action, d.desired, d.signal) == ("down", 5, "bounds")  # one step (max_step_down=1)


def test_stale_signal_never_scales_down() -> None:
    state = None
    for t in range(100):  # idle for far longer than the stable window, but stale
        state, decision = tick(state, snap(pool(4, 0, age=FAST.max_signal_age + 1)), float(t), FAST)
        assert decision.pools[0].action == "hold"
    assert decision.pools[0].signal == "stale"


def test_missing_signal_never_scales_down() -> None:
    state = None
    for t in range(100):  # nodes reported as starting / silent: no load figures at all
        state, decision = tick(state, snap(PoolSnapshot(ready=0, starting=4, signal_age=None)), float(t), FAST)
        assert (decision.pools[0].action, decision.pools[0].signal) == ("hold", "none")


def test_a_gap_in_the_data_restarts_the_stable_window() -> None:
    state = None
    for t in range(25):
        state, _ = tick(state, snap(pool(3, 0)), float(t), FAST)
    state, d = tick(state, snap(pool(3, 0, age=60.0)), 25.0, FAST)  # one stale tick
    assert d.pools[0].signal == "stale"
    for t in range(26, 26 + int(FAST.stable_window) - 1):
        state, decision = tick(state, snap(pool(3, 0)), float(t), FAST)
        assert decision.pools[0].action == "hold", t
    _, decision = tick(state, snap(pool(3, 0)), 26.0 + FAST.stable_window, FAST)
    assert decision.pools[0].action == "down"


def test_no_scale_down_while_nodes_start_or_are_removed() -> None:
    state = None
    for t in range(40):
        state, d = tick(state, snap(pool(3, 0, removing=1)), float(t), FAST)
        assert d.pools[0].action == "hold"
    assert "removing" in d.pools[0].reason
    _, d = tick(state, snap(pool(3, 0)), 40.0, FAST)
    assert d.pools[0].action == "down"


def test_starting_nodes_count_toward_current() -> None:
    """Nodes asked for are not asked for again while they start."""
    config = ScalingConfig(panic_window=0.0, cooldown_up=0.0, max_step_up=10)
    state, first = tick(None, snap(pool(1, 40)), 0.0, config)
    assert (first.pools[0].action, first.pools[0].desired) == ("up", 8)
    _, again = tick(state, snap(pool(1, 40, starting=7)), 1.0, config)
    assert again.pools[0].action == "hold"


def test_ttft_above_slo_asks_for_more_even_at_low_utilization() -> None:
    config = ScalingConfig(panic_window=0.0, ttft_slo=1.0, max_step_up=10)
    _, d = tick(None, snap(pool(2, 4, ttft_p95=2.5)), 0.0, config)
    p = d.pools[0]
    assert (p.action, p.desired, p.signal) == ("up", 5, "ttft")  # ceil(2 * 2.5 / 1.0)
    assert p.inputs["ttft_p95"] == 2.5 and p.inputs["ttft_target"] == 1.0 and p.inputs["ttft_ask"] == 5
    assert "ttft p95 2.500s vs SLO 1s" in p.reason


def test_latency_near_the_slo_holds_capacity() -> None:
    """Between headroom*SLO and the SLO, latency keeps the current count: no scale-down."""
    config = ScalingConfig(panic_window=0.0, stable_window=5.0, cooldown_down=0.0, itl_slo=0.1, latency_headroom=0.8)
    state = None
    for t in range(20):
        state, d = tick(state, snap(pool(3, 1, itl_p95=0.09)), float(t), config)
        assert d.pools[0].action == "hold"
    assert d.pools[0].signal == "itl"
    _, d = tick(state, snap(pool(3, 1, itl_p95=0.05)), 20.0, config)  # comfortable now... but the stable window remembers
    assert d.pools[0].action == "hold"


def test_the_decision_names_the_signal_that_asked_for_most() -> None:
    config = ScalingConfig(panic_window=0.0, target_queue_per_replica=2.0, max_step_up=20)
    _, d = tick(None, snap(PoolSnapshot(ready=1, running=8, waiting=20, batch_slots=8, signal_age=0.1, ttft_p95=0.1)), 0.0, config)
    p = d.pools[0]
    assert p.signal == "queue" and p.desired == 10  # queue asks ceil(20/2)=10, utilization ceil(28/5.6)=5
    assert p.inputs["utilization_ask"] == 5 and p.inputs["queue_ask"] == 10


def test_disaggregated_pools_scale_separately() -> None:
    """Prefill follows TTFT and queued prompt tokens, decode follows ITL and running batch."""
    config = ScalingConfig(panic_window=0.0, ttft_slo=1.0, itl_slo=0.05, target_prompt_tokens_per_replica=1000, max_step_up=10)
    bounds = {"prefill": PoolBounds(min_replicas=1, max_replicas=8), "decode": PoolBounds(min_replicas=1, max_replicas=8)}
    prefill_hot = DeploymentSnapshot(deployment="d", mode="disaggregated", bounds=bounds, pools={
        "prefill": PoolSnapshot(ready=1, running=1, waiting=3, batch_slots=4, queued_prompt_tokens=3500, ttft_p95=3.0, signal_age=0.1),
        "decode": PoolSnapshot(ready=2, running=4, waiting=0, batch_slots=16, itl_p95=0.01, ttft_p95=9.0, signal_age=0.1),
    })  # fmt: skip
    _, d = tick(None, prefill_hot, 0.0, config)
    by_pool = {p.pool: p for p in d.pools}
    assert (by_pool["prefill"].action, by_pool["prefill"].desired) == ("up", 4)  # tokens 3500/1000 -> 4 > TTFT 3
    assert by_pool["prefill"].signal == "prompt_tokens"
    assert by_pool["decode"].action == "hold"  # decode ignores TTFT in a disaggregated deployment
    assert "ttft_ask" not in by_pool["decode"].inputs

    decode_hot = DeploymentSnapshot(deployment="d", mode="disaggregated", bounds=bounds, pools={
        "prefill": PoolSnapshot(ready=2, running=0, waiting=0, batch_slots=8, queued_prompt_tokens=0, signal_age=0.1),
        "decode": PoolSnapshot(ready=2, running=16, waiting=0, batch_slots=16, itl_p95=0.2, signal_age=0.1),
    })  # fmt: skip
    _, d = tick(None, decode_hot, 0.0, config)
    by_pool = {p.pool: p for p in d.pools}
    assert (by_pool["decode"].action, by_pool["decode"].desired, by_pool["decode"].signal) == ("up", 8, "itl")
    assert by_pool["prefill"].action == "hold"


def test_state_is_a_value_and_tick_is_deterministic() -> None:
    s0, _ = tick(None, snap(pool(2, 4)), 0.0, FAST)
    a = tick(s0, snap(pool(2, 40)), 1.0, FAST)
    b = tick(s0, snap(pool(2, 40)), 1.0, FAST)
    assert a == b
    assert tick(s0, snap(pool(2, 40)), 1.0, FAST)[0] != s0  # s0 itself was not changed


def test_restoring_min_replicas_waits_for_the_up_cooldown() -> None:
    """A node that dies while starting is not restarted every tick."""
    config = ScalingConfig(cooldown_up=10.0)
    state, first = tick(None, snap(PoolSnapshot(), lo=1), 0.0, config)
    state, again = tick(state, snap(PoolSnapshot(), lo=1), 5.0, config)  # it died: nothing starting, nothing ready
    _, later = tick(state, snap(PoolSnapshot(), lo=1), 10.0, config)
    assert [first.pools[0].action, again.pools[0].action, later.pools[0].action] == ["up", "hold", "up"]
