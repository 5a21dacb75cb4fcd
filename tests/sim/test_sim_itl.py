"""The simulated node's ITL p95 in fast mode is the per-token one a live node reports
(issue 19): the same heartbeats, by the step-by-step engine and by fast mode."""

from __future__ import annotations

from sim_helpers import fleet_of, spec_of
from test_sim_parts import AGENT, PAIR

from tierflow.sim import SimConfig, Simulation


def _itl_beats(token_events: bool) -> dict[tuple[str, float], float]:
    sim = Simulation(spec_of(AGENT), fleet_of(PAIR), SimConfig(seed=5, autoscale=False, token_events=token_events))
    seen: dict[tuple[str, float], float] = {}
    heard = sim.router.heard

    def spy(hb, t, **kw):  # type: ignore[no-untyped-def]
        if hb.itl_p95 is not None:
            seen[(hb.node_id, round(t, 6))] = hb.itl_p95
        return heard(hb, t, **kw)

    sim.router.heard = spy  # type: ignore[method-assign]
    sim.run()
    return seen


def test_fast_mode_heartbeats_carry_the_per_token_itl_p95() -> None:
    slow, fast = _itl_beats(True), _itl_beats(False)
    assert len(slow) > 20 and slow.keys() == fast.keys()
    for key, p95 in slow.items():
        # a bucket's width (2.2%), and a request's gaps enter the window when it finishes
        assert abs(fast[key] / p95 - 1) < 0.05, (key, fast[key], p95)
