"""Two placement policies on one trace, in the simulator: the comparison table and one plot.

Replays `--window` of the Mooncake-shaped hour (`loadtest/mooncake_like_trace.py`; written
first if missing) with `loadtest/specs/mooncake-like.yaml` on
`loadtest/fleets/fleet-1000.yaml`, once per policy, the same requests both times; prints
`tierflow loadtest compare`'s table (B/A ratios) and writes both reports and a PNG: TTFT
p50 and p95 and the prefix-cache hit rate per window, the two policies on shared axes.

    .venv/bin/python loadtest/trace_policies.py [--policies hotness,round-robin] [--window 0:20m]
        [--rate-scale 2] [--workers 2] [--png docs/traces/policies.png]

The same runs from the command line:

    tierflow sim loadtest/specs/mooncake-like.yaml --fleet loadtest/fleets/fleet-1000.yaml \\
        --window 0:20m --rate-scale 2 --workers 2 --policy hotness --out hotness.json
    tierflow loadtest compare hotness.json round-robin.json
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from mooncake_like_trace import spec_trace_file
from tierflow.cli.replay_cli import trace_notes, trace_table
from tierflow.cli.sim import read_fleet, run_simulation, sim_report
from tierflow.sim import SimConfig
from tierflow.workload.compare import compare_table
from tierflow.workload.replay import parse_window, plan_replay, replay_options
from tierflow.workload.report import Report, write_report
from tierflow.workload.spec import load_spec
from tierflow.workload.traces import load_trace

HERE = Path(__file__).resolve().parent


def _plot(reports: list[Report], path: Path) -> Path:
    """TTFT p50/p95 and the prefix hit rate per window, one line per policy and figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)
    ttft, hits = figure.subplots(2, 1, sharex=True)
    for report in reports:
        middles = [(w.start + w.end) / 2 for w in report.timeline]
        nan = float("nan")
        for label, pick, style in (("p50", lambda w: w.ttft_p50_ms, "-"), ("p95", lambda w: w.ttft_p95_ms, "--")):
            line = ttft.plot(middles, [nan if pick(w) is None else pick(w) for w in report.timeline], style, label=f"{report.meta.policy} {label}")
            line[0].set_color(f"C{reports.index(report)}")
        hits.plot(middles, [nan if w.prefix_hit_rate is None else w.prefix_hit_rate for w in report.timeline],
                  color=f"C{reports.index(report)}", label=report.meta.policy)  # fmt: skip
    ttft.set_yscale("log")
    ttft.set_ylabel("TTFT (ms, log)")
    ttft.set_title("time to first token per window")
    hits.set_ylabel("cached / prompt tokens")
    hits.set_title("prefix-cache hit rate per window")
    hits.set_ylim(0, 1)
    hits.set_xlabel(f"time since start (s); {reports[0].window_s:g} s windows")
    for ax in (ttft, hits):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    meta = reports[0].meta
    figure.suptitle(f"{meta.spec}: {reports[0].totals.requests:,} requests on {meta.notes.get('nodes_initial', '?')} nodes, simulated")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=90)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=HERE / "specs" / "mooncake-like.yaml")
    parser.add_argument("--fleet", type=Path, default=HERE / "fleets" / "fleet-1000.yaml")
    parser.add_argument("--policies", default="hotness,round-robin")
    parser.add_argument("--window", default="0:20m")
    parser.add_argument("--rate-scale", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "trace-policies")
    parser.add_argument("--png", type=Path, default=HERE.parent / "docs" / "traces" / "policies.png")
    args = parser.parse_args()
    console = Console()

    spec = load_spec(args.spec)
    trace_file = spec_trace_file(args.spec, spec)
    assert spec.trace is not None
    options = replay_options(spec.trace, seed=spec.seed, window=parse_window(args.window), rate_scale=args.rate_scale)
    replay = plan_replay(load_trace(trace_file, format=spec.trace.format), spec, options)
    fleet = read_fleet(args.fleet)
    reports = []
    for policy in args.policies.split(","):
        config = SimConfig(policy=policy)
        began = time.perf_counter()
        result = run_simulation(spec, fleet, config, workers=args.workers, plans=replay.plans)
        report = sim_report(
            spec, result, config, wall_s=time.perf_counter() - began, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            notes={"fleet_file": str(args.fleet), "workers": args.workers, **trace_notes(replay.summary)},
            duration_s=replay.duration_s, trace=replay.summary,
        )  # fmt: skip
        console.print(f"wrote {write_report(report, args.out / f'{policy}.json')} ({report.meta.wall_s:.0f} s)")
        reports.append(report)
    console.print(trace_table(reports[0].trace or replay.summary))
    console.print(compare_table(reports[0], reports[1]))
    console.print(f"wrote {_plot(reports, args.png)}")


if __name__ == "__main__":
    main()
