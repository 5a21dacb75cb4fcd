"""Scheduler states the simulator's loads reached and the unit tests had not.

Agentic load at twice the repository spec's rate on its four-model fleet (HBM cannot hold
all four 70B-class models) once crashed a node's engine 6 minutes in: while choosing the
next model, checking a later model marked it blocked (no HBM to load it into), and that
older blocked waiter made the hot model already picked wait its turn (`_fair`), so the
engine began a model with nothing it could admit ("scheduler invariant broken").
"""

from __future__ import annotations

from pathlib import Path

from sim_helpers import run

ROOT = Path(__file__).resolve().parents[2]


def test_agentic_load_at_twice_the_rate_runs_to_the_end() -> None:
    spec = (ROOT / "loadtest/specs/agentic.yaml").read_text()
    fleet = (ROOT / "loadtest/fleets/agentic.yaml").read_text()
    result = run(spec, fleet, policy="round-robin", autoscale=False, rate_scale=2.0, duration_s=420.0)
    assert len(result.records) > 1500
    assert all(r.outcome in ("ok", "rejected") for r in result.records), {r.outcome for r in result.records}
