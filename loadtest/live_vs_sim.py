"""Do the live fabric and the simulator agree? One small spec, run both ways, compared.

The simulator is only worth its speed if it predicts what the fabric does. This runs the
same sessions (same spec, same seed, same arrival cap) twice in one invocation:

- live: a fresh `tierflow up` on the fleet file (its replicas, the autoscaler acting on
  nothing: `--actuator none`), driven through the OpenAI endpoint by the load generator;
- simulated: `tierflow.sim` on the same fleet file, autoscaling off, in virtual time;

then prints the two reports side by side and the relative differences of TTFT p50, TTFT
p95 and throughput (requests/s), and exits 1 when one of them is 15% or more.

What is compared is the fabric's TTFT: from the router taking a request to its first
token leaving the router, as the router's per-request log records it, against the
simulated TTFT without the two client legs. The simulator models the fabric, not the
client: the Python `openai` client adds several milliseconds of its own per request on
a busy 2-core machine (printed too, for information), which no fleet model should try to
predict.

One figure is measured, not modelled: a message hop (router -> node or back, with the
node's event loop). Before the run the live fabric answers 30 one-token requests; half
their median router-side TTFT is the simulator's `hop_s`. That is one parameter, fitted to
a probe with no emulated work, not to the figures compared.

    .venv/bin/python loadtest/live_vs_sim.py [--spec loadtest/specs/agreement.yaml] [--duration 90]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import openai
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
PROBES = 30
FABRIC_HOPS = 2  # router -> node, and the first token back: node -> router
CLIENT_HOPS = 2  # client -> router, router -> client: outside the fabric's TTFT


def _meta(spec: WorkloadSpec, source: str, duration_s: float, wall_s: float) -> ReportMeta:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return ReportMeta(spec=spec.name, source=source, policy="hotness", duration_s=duration_s, wall_s=wall_s, started_at=started)  # type: ignore[arg-type]


async def probe(base_url: str, model: str) -> None:
    """One-token requests, one at a time: the path's cost with (almost) no emulated work."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="probe", max_retries=0)
    for _ in range(PROBES):
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1, stream=True)
        async for _chunk in stream:
            pass
    await client.close()


def router_ttfts(log: str) -> list[float]:
    """Router-side TTFTs (seconds) of successful requests, in the order they finished."""
    out = []
    for line in log.splitlines():
        if '"msg":"request"' in line:
            record = json.loads(line)
            if record.get("outcome") == "ok":
                out.append(float(record["time_to_first_token"]))
    return out


def run_live_report(spec: WorkloadSpec, fleet: Path, duration_s: float, replicas: int, model: str) -> tuple[Report, list[float], float]:
    """The live report (client side), the router's TTFTs of the run, and the probe's median."""
    plans = plan_sessions(spec, duration_s=duration_s)
    with tempfile.TemporaryDirectory() as tmp:
        fabric = start_fabric(
            Path(tmp), "--fleet", str(fleet), "--decode-nodes", str(replicas), "--prefill-nodes", "0", "--actuator", "none",
            cwd=ROOT,
        )  # fmt: skip
        try:
            asyncio.run(probe(fabric.base_url, model))
            run = asyncio.run(run_live(plans, base_url=fabric.base_url))
        finally:
            fabric.stop()
            ttfts = router_ttfts(fabric.log("router"))
    meta = _meta(spec, "live", run_length(spec.arrivals, duration_s=duration_s), run.wall_s)
    return build_report(run.records, slo=spec.slo, meta=meta), ttfts[PROBES:], statistics.median(ttfts[:PROBES])


def run_sim(spec: WorkloadSpec, fleet: Path, duration_s: float, hop_s: float) -> tuple[Report, list[float]]:
    """The simulated report, and its TTFTs without the client legs."""
    began = time.perf_counter()
    result = simulate(spec, read_fleet(fleet), SimConfig(duration_s=duration_s, autoscale=False, hop_s=hop_s))
    wall_s = time.perf_counter() - began
    report = build_report(result.records, slo=spec.slo, meta=_meta(spec, "sim", run_length(spec.arrivals, duration_s=duration_s), wall_s))
    fabric_ttfts = [r.ttft - CLIENT_HOPS * hop_s for r in result.records if r.outcome == "ok" and r.ttft is not None]
    return report, fabric_ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=HERE / "specs/agreement.yaml")
    parser.add_argument("--fleet", type=Path, default=HERE / "fleets/agreement.yaml")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals (caps the spec)")
    parser.add_argument("--out", type=Path, help="write live.json and sim.json into this directory")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    records = read_fleet(args.fleet)
    replicas = sum(d.replicas for d in records.deployments)
    live, live_fabric, probe_s = run_live_report(spec, args.fleet, args.duration, replicas, records.deployments[0].models[0].model)
    hop_s = probe_s / FABRIC_HOPS
    sim, sim_fabric = run_sim(spec, args.fleet, args.duration, hop_s)
    Console().print(compare_table(live, sim))
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    rows = {
        "TTFT p50 (ms)": (pct(live_fabric, 50), pct(sim_fabric, 50)),
        "TTFT p95 (ms)": (pct(live_fabric, 95), pct(sim_fabric, 95)),
        "throughput (req/s)": (live.totals.throughput_rps, sim.totals.throughput_rps),
    }
    print(f"live vs simulated, {live.totals.requests} requests each ({args.spec.name}, {args.duration:.0f} s of arrivals); "
          f"TTFT is the fabric's (router in -> first token out):")
    worst = 0.0
    for name, (a, b) in rows.items():
        diff = abs(b - a) / a if a else float("inf")
        worst = max(worst, diff)
        print(f"  {name:<20} live {a:10.2f}   sim {b:10.2f}   difference {diff:6.1%}")
    client = live.totals.ttft_ms
    print(f"  for information, TTFT at the Python client: live p50 {client.p50:.2f} ms, p95 {client.p95:.2f} ms")
    print(f"  probe: {PROBES} one-token requests, router-side TTFT median {probe_s * 1e3:.2f} ms -> simulator hop_s {hop_s * 1e3:.2f} ms")
    print(f"  simulated {sim.meta.duration_s:.0f} s in {sim.meta.wall_s:.2f} s of wall time")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_report(live, args.out / "live.json")
        write_report(sim, args.out / "sim.json")
    print(f"{'agree' if worst < TOLERANCE else 'DISAGREE'}: largest difference {worst:.1%} (bar: {TOLERANCE:.0%})")
    sys.exit(0 if worst < TOLERANCE else 1)


if __name__ == "__main__":
    main()
