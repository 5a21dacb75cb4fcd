"""How fast the fleet simulator runs: an hour of bursty agentic traffic on 1,000 nodes.

Simulates `--spec` on `--fleet` (by default loadtest/specs/fleet-1000.yaml on
loadtest/fleets/fleet-1000.yaml: four bundles on 1,000 nodes, the autoscaler acting) in
`--workers` processes (independent deployment groups side by side, see
`tierflow.sim.shards`) and prints what it simulated and how fast: virtual seconds, wall
seconds and their ratio, requests served and requests per wall second, the fleet's mean
chip utilisation (overall and per deployment) and its size over the run. The bar: an hour
on 1,000 nodes in under 5 minutes on a 2-core machine.

With `--policies hotness,round-robin` it runs the same trace (same seed) once per policy
and prints the two reports side by side (`tierflow loadtest compare`'s table).

    .venv/bin/python loadtest/sim_speed.py [--hours 1] [--nodes 1000] [--workers 2] [--policies hotness]
"""

from __future__ import annotations

import argparse
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from tierflow.cli.sim import read_fleet, run_simulation, sim_report, summary_table
from tierflow.sim import SimConfig
from tierflow.workload.compare import compare_table
from tierflow.workload.report import Report
from tierflow.workload.spec import load_spec

HERE = Path(__file__).resolve().parent
BAR_S = 300.0


def _cpu_s() -> float:
    """CPU seconds of this process and its finished workers (wall time hides a busy machine)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_one(args: argparse.Namespace, policy: str, console: Console) -> Report:
    spec, fleet = load_spec(args.spec), read_fleet(args.fleet)
    config = SimConfig(
        nodes=args.nodes, duration_s=args.hours * 3600.0, policy=policy, heartbeat_s=args.heartbeat_s, seed=args.seed,
    )  # fmt: skip
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cpu, began = _cpu_s(), time.perf_counter()
    result = run_simulation(spec, fleet, config, workers=args.workers)
    wall_s, cpu_s = time.perf_counter() - began, _cpu_s() - cpu
    report = sim_report(spec, result, config, wall_s=wall_s, started_at=started_at, notes={"workers": args.workers})
    stats = result.stats
    console.print(summary_table(report, result))
    served = report.totals.ok
    print(f"policy {policy}: {stats.nodes_initial} nodes, {args.workers} worker process(es)")
    print(f"  simulated {stats.virtual_s:10,.0f} virtual s in {wall_s:8.1f} wall s: {stats.virtual_s / wall_s:6.1f}x real time"
          f"  (CPU {cpu_s:.1f} s over all processes)")  # fmt: skip
    print(f"  requests  {report.totals.requests:10,} sent, {served:,} served, {served / wall_s:,.0f} served per wall second;"
          f" {stats.sessions:,} sessions, {stats.heartbeats:,} heartbeats, {stats.events:,} events")  # fmt: skip
    per = ", ".join(f"{name} {share:.0%}" for name, share in stats.by_deployment.items())
    print(f"  chip utilisation {stats.utilisation:.1%} mean ({per})")
    print(f"  nodes     {stats.nodes_initial} at start, {stats.nodes_peak} at peak, {stats.nodes_final} at the end;"
          f" {stats.nodes_started} started, {stats.nodes_stopped} stopped by the autoscaler")  # fmt: skip
    verdict = "within" if wall_s < BAR_S else "OVER"
    print(f"  {verdict} the {BAR_S:.0f} s bar for {args.hours:g} h on this machine")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=HERE / "specs/fleet-1000.yaml")
    parser.add_argument("--fleet", type=Path, default=HERE / "fleets/fleet-1000.yaml")
    parser.add_argument("--nodes", type=int, default=None, help="rescale the fleet to N nodes (default: the file's 1,000)")
    parser.add_argument("--hours", type=float, default=1.0, help="hours of arrivals to simulate")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (the bar is for 2)")
    parser.add_argument("--policies", default="hotness", help="comma-separated placement policies, run on the same trace")
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="node heartbeat interval")
    parser.add_argument("--seed", type=int, default=None, help="workload seed (default: the spec's)")
    args = parser.parse_args()
    console = Console()
    reports = [run_one(args, policy.strip(), console) for policy in args.policies.split(",") if policy.strip()]
    if len(reports) == 2:
        console.print(compare_table(reports[0], reports[1]))


if __name__ == "__main__":
    main()
