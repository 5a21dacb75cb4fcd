"""How fast the simulator replays an hour of a production-shaped trace on 1,000 nodes, at a real load.

Generates the Mooncake-shaped hour (`loadtest/mooncake_like_trace.py`, seed 7: 23,309
requests, mean 8.6k tokens in and 180 out, 58% of prompt tokens reusable) unless it is
already there, replays it with `loadtest/specs/mooncake-like.yaml` on
`loadtest/fleets/fleet-1000.yaml` (autoscaling on, the fabric's 1 s heartbeats) over
`--workers` processes, and prints the trace table (trace, sent, measured), the load it put
on the fleet, what the run cost (planning, simulating, CPU) and the simulated-to-wall speed.

    .venv/bin/python loadtest/trace_replay_speed.py [--rate-scale 20] [--workers 3] [--hours 1]

The load is the point: a replay that leaves the fleet idle says nothing about speed. The
trace's own rate (6.5 requests/s) would keep 1,000 nodes ~1% busy, so the rate scale
multiplies its rows (each keeping its tokens) until the fleet works: at the default 20
(466k requests in the hour) the deployments serving the trace run 16-39% busy on average
and in the trace's peak minute (1.74x its mean) 28-68%, with 91% of requests inside the
SLO: a fleet sized for its peak. Printed per deployment, so another scale can be judged
the same way.

Three workers on two cores: the trace sends most rows to the two 405B products, and
splitting the deployments three ways lets the two cores share that work evenly.
It prints, it does not assert.
"""

from __future__ import annotations

import argparse
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console

from mooncake_like_trace import spec_trace_file
from tierflow.cli.replay_cli import trace_notes, trace_table
from tierflow.cli.sim import read_fleet, run_simulation, sim_report, summary_table
from tierflow.sim import SimConfig
from tierflow.workload.replay import plan_replay, replay_options
from tierflow.workload.report import write_report
from tierflow.workload.spec import load_spec
from tierflow.workload.traces import load_trace

HERE = Path(__file__).resolve().parent
BUDGET_S = 300.0  # the target: an hour of a 1,000-node fleet in under 5 minutes


def _cpu_s() -> float:
    """CPU seconds of this process and its finished workers: on a machine shared with other
    work, wall time overstates what the replay itself costs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=HERE / "specs" / "mooncake-like.yaml")
    parser.add_argument("--fleet", type=Path, default=HERE / "fleets" / "fleet-1000.yaml")
    parser.add_argument("--rate-scale", type=float, default=20.0)
    parser.add_argument("--hours", type=float, default=1.0, help="hours of the trace to replay (from its start)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--policy", default=None, help="placement policy (default: hotness)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "trace-replay-speed.json")
    args = parser.parse_args()
    console = Console()

    spec = load_spec(args.spec)
    trace_file = spec_trace_file(args.spec, spec)
    assert spec.trace is not None
    began, cpu_began = time.perf_counter(), _cpu_s()
    trace = load_trace(trace_file, format=spec.trace.format)
    options = replay_options(spec.trace, seed=spec.seed, window=(0.0, args.hours * 3600.0), rate_scale=args.rate_scale)
    replay = plan_replay(trace, spec, options)
    planned = time.perf_counter()
    fleet = read_fleet(args.fleet)
    config = SimConfig(policy=args.policy)
    result = run_simulation(spec, fleet, config, workers=args.workers, plans=replay.plans)
    simulated = time.perf_counter()
    cpu_s = _cpu_s() - cpu_began

    wall_s = simulated - began
    notes: dict[str, str | float | int] = {"spec_file": str(args.spec), "fleet_file": str(args.fleet), "workers": args.workers}
    report = sim_report(
        spec, result, config, wall_s=wall_s, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes | trace_notes(replay.summary), duration_s=replay.duration_s, trace=replay.summary,
    )  # fmt: skip
    console.print(trace_table(report.trace or replay.summary))
    console.print(summary_table(report, result))
    stats = result.stats
    beats_share = stats.heartbeats / max(stats.events, 1)
    busy = ", ".join(f"{name} {share:.0%}" for name, share in sorted(stats.by_deployment.items(), key=lambda kv: -kv[1]))
    per_minute = np.bincount((trace.time_s[trace.time_s < args.hours * 3600.0] // 60).astype(np.int64))
    peak = float(per_minute.max() / per_minute.mean()) if per_minute.size else 0.0
    console.print(
        f"trace {trace_file.name}: {trace.rows:,} rows; rate scale {args.rate_scale:g} -> {len(replay.plans):,} requests "
        f"on {stats.nodes_initial:,} nodes (chip utilisation {stats.utilisation:.1%})\n"
        f"read and planned in {planned - began:.1f} s, simulated in {simulated - planned:.1f} s with {args.workers} worker(s): "
        f"{stats.virtual_s:,.0f} virtual s in {wall_s:.1f} wall s = {stats.virtual_s / wall_s:.1f}x real time, "
        f"{len(replay.plans) / (simulated - planned):,.0f} requests per wall second; {cpu_s:.0f} CPU s in all "
        f"({cpu_s / wall_s:.2f} of {args.workers} cores busy on average)\n"
        f"events {stats.events:,} ({beats_share:.0%} of them heartbeats: {stats.heartbeats:,})\n"
        f"load: chip utilisation per deployment {busy}; the trace's busiest minute carries {peak:.2f}x its mean\n"
        f"{'within' if wall_s < BUDGET_S else 'OVER'} the {BUDGET_S:.0f} s budget"
    )
    console.print(f"wrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
