"""How fast `build_report` turns a simulation's records into a report: records per second.

The simulator may hand the report millions of RequestRecords, so the report is built
from numpy columns (one pass to extract them) rather than per-record Python. This makes
`--records` synthetic records (agent sessions of 5 calls over 3 models and `--nodes`
nodes, mixed tiers, 10% errors and rejections, over a `--duration` second run), then
times extracting the columns plus every summary, per-model summary and window, and
writing the JSON. It prints, it does not assert: the figures are for comparing changes
on one machine.

    python loadtest/report_speed.py [--records 1000000] [--nodes 1000] [--duration 3600] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from tierflow.workload.records import RequestRecord
from tierflow.workload.report import ReportMeta, build_report, write_report
from tierflow.workload.spec import Slo

MODELS = ("planner", "reasoner", "summarizer")
TIERS = ("hbm", "hbm", "hbm", "sram", "ddr", "cold", "")
OUTCOMES = ("ok",) * 18 + ("error", "rejected")


def make_records(n: int, n_nodes: int, duration_s: float, rng: random.Random) -> list[RequestRecord]:
    records = []
    for i in range(n):
        sent = rng.random() * duration_s
        outcome = rng.choice(OUTCOMES)
        ok = outcome == "ok"
        ttft = rng.lognormvariate(-1.5, 0.6)
        tokens = rng.randint(1, 256) if ok else 0
        records.append(
            RequestRecord(
                request_id=f"r{i}", session_id=f"s{i // 5}", tenant="acme", flow="coding-agent", step=i % 5,
                model=MODELS[i % 3], sent_at=sent,
                first_token_at=sent + ttft if ok else None,
                finished_at=sent + ttft + tokens * rng.uniform(0.01, 0.05) if ok else None,
                prompt_tokens=rng.randint(200, 4000), completion_tokens=tokens, cached_tokens=rng.choice((0, 0, 128, 1024)),
                tier=rng.choice(TIERS) if ok else "", node=f"node-{rng.randrange(n_nodes):04d}" if outcome != "rejected" else "",
                outcome=outcome, status={"ok": 200, "error": 500, "rejected": 429}[outcome],
            )
        )  # fmt: skip
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    started = time.perf_counter()
    records = make_records(args.records, args.nodes, args.duration, random.Random(args.seed))
    print(f"made {len(records):,} records in {time.perf_counter() - started:.1f} s (not part of the figure)")

    meta = ReportMeta("report_speed", "sim", "synthetic", args.duration, 0.0, "")
    slo = Slo(ttft_ms=500, itl_ms=40, e2e_ms=10_000)
    started = time.perf_counter()
    report = build_report(records, slo=slo, meta=meta)
    built = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = write_report(report, Path(tmp) / "report.json")
        written, size = time.perf_counter() - started, path.stat().st_size

    print(f"build_report: {built:.2f} s for {len(records):,} records = {len(records) / built:,.0f} records/s "
          f"({built / len(records) * 1e6:.2f} us/record), {len(report.timeline)} windows of {report.window_s:g} s, "
          f"{len(report.per_model)} models")  # fmt: skip
    print(f"write_report: {written * 1e3:.1f} ms, {size / 1024:.0f} KiB of JSON")
    t = report.totals
    print(f"check: {t.requests:,} requests, ok {t.ok:,}, TTFT p50/p99 {t.ttft_ms.p50:.0f}/{t.ttft_ms.p99:.0f} ms, "
          f"goodput {t.goodput_share:.1%}, cold {t.cold_share:.1%}, nodes/session {t.nodes_per_session:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
