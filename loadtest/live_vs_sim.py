"""Do the live fabric and the simulator agree? One small spec, run both ways, compared.

The simulator is only worth its speed if it predicts what the fabric does. This runs the
same sessions (same spec, same seed, same arrival cap) twice in one invocation:

- live: a fresh `tierflow up` on the fleet file (its replicas, the autoscaler acting on
  nothing: `--actuator none`), driven through the OpenAI endpoint by the load generator;
- simulated: `tierflow.sim` on the same fleet file, autoscaling off, in virtual time;

then prints the two reports side by side and the relative differences of TTFT p50, TTFT
p95 and throughput (requests/s), and exits 1 when one of them is 15% or more.

    .venv/bin/python loadtest/live_vs_sim.py [--spec loadtest/specs/agreement.yaml] [--duration 90]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from tierflow.cli.sim import read_fleet
from tierflow.harness import start_fabric
from tierflow.sim import SimConfig, simulate
from tierflow.workload.arrivals import run_length
from tierflow.workload.compare import compare_table
from tierflow.workload.live import run_live
from tierflow.workload.report import Report, ReportMeta, build_report, write_report
from tierflow.workload.sessions import plan_sessions
from tierflow.workload.spec import WorkloadSpec, load_spec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOLERANCE = 0.15


def _meta(spec: WorkloadSpec, source: str, duration_s: float, wall_s: float) -> ReportMeta:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return ReportMeta(spec=spec.name, source=source, policy="hotness", duration_s=duration_s, wall_s=wall_s, started_at=started)  # type: ignore[arg-type]


def run_live_report(spec: WorkloadSpec, fleet: Path, duration_s: float, replicas: int) -> Report:
    plans = plan_sessions(spec, duration_s=duration_s)
    with tempfile.TemporaryDirectory() as tmp:
        fabric = start_fabric(
            Path(tmp), "--fleet", str(fleet), "--decode-nodes", str(replicas), "--prefill-nodes", "0", "--actuator", "none",
            cwd=ROOT,
        )  # fmt: skip
        try:
            run = asyncio.run(run_live(plans, base_url=fabric.base_url))
        finally:
            fabric.stop()
    return build_report(run.records, slo=spec.slo, meta=_meta(spec, "live", run_length(spec.arrivals, duration_s=duration_s), run.wall_s))


def run_sim_report(spec: WorkloadSpec, fleet: Path, duration_s: float) -> Report:
    began = time.perf_counter()
    result = simulate(spec, read_fleet(fleet), SimConfig(duration_s=duration_s, autoscale=False))
    wall_s = time.perf_counter() - began
    return build_report(result.records, slo=spec.slo, meta=_meta(spec, "sim", run_length(spec.arrivals, duration_s=duration_s), wall_s))


def differences(live: Report, sim: Report) -> dict[str, tuple[float, float, float]]:
    """metric -> (live, sim, |sim - live| / live)."""
    pairs = {
        "TTFT p50 (ms)": (live.totals.ttft_ms.p50, sim.totals.ttft_ms.p50),
        "TTFT p95 (ms)": (live.totals.ttft_ms.p95, sim.totals.ttft_ms.p95),
        "throughput (req/s)": (live.totals.throughput_rps, sim.totals.throughput_rps),
    }
    out = {}
    for name, (a, b) in pairs.items():
        if a is None or b is None:
            raise SystemExit(f"{name}: no value ({'live' if a is None else 'sim'} report has no successful request)")
        out[name] = (a, b, abs(b - a) / a if a else float("inf"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=HERE / "specs/agreement.yaml")
    parser.add_argument("--fleet", type=Path, default=ROOT / "deploy/examples/fleet.yaml")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals (caps the spec)")
    parser.add_argument("--out", type=Path, help="write live.json and sim.json into this directory")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    replicas = sum(d.replicas for d in read_fleet(args.fleet).deployments)
    live = run_live_report(spec, args.fleet, args.duration, replicas)
    sim = run_sim_report(spec, args.fleet, args.duration)
    console = Console()
    console.print(compare_table(live, sim))
    worst = 0.0
    print(f"live vs simulated, {live.totals.requests} requests each ({args.spec.name}, {args.duration:.0f} s of arrivals):")
    for name, (a, b, diff) in differences(live, sim).items():
        worst = max(worst, diff)
        print(f"  {name:<20} live {a:10.2f}   sim {b:10.2f}   difference {diff:6.1%}")
    print(f"  simulated {sim.meta.duration_s:.0f} s in {sim.meta.wall_s:.2f} s of wall time")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_report(live, args.out / "live.json")
        write_report(sim, args.out / "sim.json")
    verdict = "agree" if worst < TOLERANCE else "DISAGREE"
    print(f"{verdict}: largest difference {worst:.1%} (bar: {TOLERANCE:.0%})")
    sys.exit(0 if worst < TOLERANCE else 1)


if __name__ == "__main__":
    main()
