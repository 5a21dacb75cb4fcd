"""The fault suite: every process of the fabric killed in turn under load, and what clients saw.

Starts `tierflow up --nats-cluster 3 --routers 2` on loadtest/fleets/faults.yaml (an
agentic two-model bundle on 3 decode nodes, a disaggregated 70B with 1 decode and 3
prefill nodes; 10 tokens/s per stream) and puts the project's own load on
it: agent sessions from loadtest/specs/faults.yaml (multi-model, streamed, prompts
growing step by step, `ignore_eos` so the token count of every answer is known), plus a
registry writer acknowledging a traffic change a few times a second. Then, each after a
steady period and followed by a recovery period:

    decode        SIGKILL the busiest decode node
    prefill       SIGKILL the busiest prefill node
    router        SIGKILL a router
    registry      SIGKILL the model registry
    autoscaler    SIGKILL the autoscaler
    nats-member   SIGKILL the NATS member with the most clients
    stall-decode  SIGSTOP the busiest decode node for 3 s, then SIGCONT
    nats-outage   SIGSTOP every NATS member for 5 s, then SIGCONT, under 200 more streams

and prints one row per fault: calls sent, hung, failed (and why), failed before their
first token, streams whose node died mid-generation that still completed with the exact
token count, calls migrated or retried invisibly (the routers' request records),
registry writes lost / acknowledged, and the time until tokens/s was back. The issue's
"must"s are judged per row (see loadtest/faultkit/report.py); the exit status is 1 if
any failed. Logs, the JSON of every row and call stay in --out.

    .venv/bin/python loadtest/faults.py                         # the long form, ~12 min
    .venv/bin/python loadtest/faults.py --faults decode,router --steady 10 --recovery 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultkit.catalog import FAULTS  # noqa: E402
from faultkit.report import format_table  # noqa: E402
from faultkit.run import SuiteConfig, SuiteResult, run_suite  # noqa: E402

HERE = Path(__file__).resolve().parent


def summary_lines(result: SuiteResult) -> list[str]:
    ledger = result.ledger
    acked = sum(w.acked is not None for w in ledger.writes)
    return [
        f"registry writes: {len(ledger.writes)} sent, {acked} acknowledged, {len(ledger.lost)} lost; "
        f"final read {'ok' if result.final_read_ok else 'FAILED'} ({ledger.reads} reads, {ledger.read_errors} failed)",
        f"calls: {len(result.calls)}; still open after the load stopped and the hang timeout: {result.hung_at_end}",
        "verdict: " + ("every must holds" if result.passed else "SOME MUST FAILED"),
    ]


def write_json(result: SuiteResult, path: Path) -> None:
    path.write_text(json.dumps({
        "rows": [r.as_dict() for r in result.rows],
        "ledger": {"writes": len(result.ledger.writes), "lost": sorted(result.ledger.lost), "reads": result.ledger.reads},
        "hung_at_end": result.hung_at_end, "final_read_ok": result.final_read_ok, "passed": result.passed,
        "tokens_per_s": result.tokens_per_s, "calls": msgspec.to_builtins(result.calls),
    }, indent=1))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, in order (default: all)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the first fault")
    parser.add_argument("--steady", type=float, default=25.0, help="seconds of steady load before each fault (its baseline)")
    parser.add_argument("--recovery", type=float, default=45.0, help="seconds after each fault before the next steady period")
    parser.add_argument("--rate-scale", type=float, default=2.0, help="multiplies the spec's session rate")
    parser.add_argument("--hang-timeout", type=float, default=90.0, help="a call open this long is hung")
    parser.add_argument("--streamers", type=int, default=200, help="extra concurrent streams during the NATS outage")
    parser.add_argument("--out", type=Path, default=None, help="directory for the fabric's data, logs and the JSON (default loadtest/out/faults-<time>)")
    args = parser.parse_args()
    out = args.out or HERE / "out" / f"faults-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    config = SuiteConfig(faults=[f for f in args.faults.split(",") if f], warmup_s=args.warmup, steady_s=args.steady, recovery_s=args.recovery,
                         rate_scale=args.rate_scale, hang_timeout_s=args.hang_timeout, streamers=args.streamers, data_dir=out / "fabric")  # fmt: skip

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    result = run_suite(config, say)
    print()
    print(format_table(result.rows))
    print()
    for line in summary_lines(result):
        print(line)
    write_json(result, out / "faults.json")
    print(f"wrote {out / 'faults.json'} (logs: {out / 'fabric' / 'logs'})")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
