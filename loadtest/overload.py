"""Overload: at 3x capacity, admitted calls keep their TTFT SLO, the rest are refused at once.

Runs two fabrics one after the other, the same fleet (loadtest/fleets/faults-overload.yaml:
one model on two decode nodes, 16 batch slots, 10 tokens/s per stream) and the same load
(loadtest/specs/overload.yaml: Poisson single calls, streamed, 32 tokens, TTFT SLO 2 s):

1. the router with admission off (`--queue-budget 0`, as TIERFLOW_QUEUE_BUDGET): a ramp
   finds capacity (the highest rate whose calls all succeed with p95 TTFT inside the
   SLO), then --capacity-s at capacity and --minutes at --factor x capacity;
2. the router with admission on (its default queue budget): the same two phases.

and prints one row per phase: calls sent and offered rate, ok, goodput (calls completed
with the exact token count and TTFT inside the SLO, per second), TTFT p50/p95 of the
admitted calls, refusals (429/503) with their latency p50/p99 and how many carried
Retry-After, other failures, calls cut off at the end. The issue's figures, judged on
the admission-on fabric at 3x: admitted TTFT p95 inside the SLO; refusals answered in
under 100 ms (p99) with Retry-After; goodput not below its value at capacity (5%
tolerance: the two phases are separate Poisson draws). The admission-off run is the
comparison (a ratio: this machine is shared and noisy). Exit status 1 if a figure fails.

The load comes from `faultkit.load` (the official openai client, `chat_stream` for the
SSE body): at ~15 calls/s it costs a few percent of one core, so the client never
measures itself.

    .venv/bin/python loadtest/overload.py                      # long form: 3x for 5 minutes
    .venv/bin/python loadtest/overload.py --minutes 0.5 --step 10 --capacity-s 20   # short
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultkit.capacity import Phase, phase, ramp  # noqa: E402
from faultkit.fabric import PROFILES, REPO  # noqa: E402

from tierflow.harness import Fabric, start_fabric  # noqa: E402
from tierflow.workload.spec import load_spec  # noqa: E402

HERE = Path(__file__).resolve().parent
FLEET = HERE / "fleets" / "faults-overload.yaml"
SPEC = HERE / "specs" / "overload.yaml"
REFUSAL_MS = 100.0
GOODPUT_TOLERANCE = 0.95


def start(data: Path, *, admission: bool) -> Fabric:
    data.mkdir(parents=True, exist_ok=True)
    env = {} if admission else {"TIERFLOW_QUEUE_BUDGET": "0"}
    return start_fabric(data, "--fleet", str(FLEET), "--profiles", str(PROFILES), "--deployment", "chat", "--decode-nodes", "2",
                        "--prefill-nodes", "0", "--actuator", "none", env=env, cwd=REPO)  # fmt: skip


def row(p: Phase) -> str:
    def f(v: float | None, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    return (f"{p.label:<24} {p.sent:>6} {p.offered_per_s:>7.2f} {p.ok:>6} {p.goodput_per_s:>8.2f} {f(p.ttft_p50_s):>7} {f(p.ttft_p95_s):>7} "
            f"{p.refused:>7} {f(p.refusal_p50_ms, '{:.1f}'):>7} {f(p.refusal_p99_ms, '{:.1f}'):>7} {p.refused_with_retry_after:>6} {p.failed:>6} {p.cut_off:>5}")  # fmt: skip


HEADER = (f"{'phase':<24} {'sent':>6} {'/s':>7} {'ok':>6} {'goodput':>8} {'ttft50':>7} {'ttft95':>7} "
          f"{'refused':>7} {'ref50ms':>7} {'ref99ms':>7} {'retry':>6} {'failed':>6} {'cut':>5}")  # fmt: skip


async def measure(fabric: Fabric, label: str, rate: float, seconds: float, slo: float) -> Phase:
    return await phase(fabric.base_url, SPEC, rate, seconds, slo_ttft_s=slo, grace=slo + 10, label=label)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--factor", type=float, default=3.0, help="overload = factor x capacity")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each overload phase")
    parser.add_argument("--capacity-s", type=float, default=60.0, help="length of each phase at capacity")
    parser.add_argument("--step", type=float, default=30.0, help="seconds per ramp step")
    parser.add_argument("--ramp", default="1,2,2.5,3,3.5,4,4.5,5,5.5,6,7,8", help="calls/s to try, in order")
    parser.add_argument("--capacity", type=float, default=None, help="skip the ramp: capacity in calls/s")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    slo = (load_spec(SPEC).slo.ttft_ms or 2000) / 1000

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    phases: dict[str, Phase] = {}
    capacity = args.capacity
    with tempfile.TemporaryDirectory(prefix="tierflow-overload-") as tmp:
        for admission in (False, True):
            name = "admission on" if admission else "admission off"
            say(f"starting tierflow up ({name}) ...")
            fabric = start(Path(tmp) / name.replace(" ", "-"), admission=admission)
            try:
                if capacity is None:
                    say(f"ramp ({args.step:g}s a step, TTFT SLO {slo:g}s)")
                    capacity, steps = asyncio.run(ramp(fabric.base_url, SPEC, [float(x) for x in args.ramp.split(",")], args.step, slo_ttft_s=slo, say=say))
                    for s in steps:
                        phases[s.label] = s
                    if capacity is None:
                        say("the first ramp step already misses the SLO: nothing to compare")
                        return 1
                    say(f"capacity: {capacity:.2f} calls/s")
                for label, rate, seconds in ((f"{name}, 1x", capacity, args.capacity_s), (f"{name}, {args.factor:g}x", args.factor * capacity, args.minutes * 60)):
                    say(f"{label}: {rate:.2f} calls/s for {seconds:g}s")
                    phases[label] = asyncio.run(measure(fabric, label, rate, seconds, slo))
                    say("  " + row(phases[label]))
            finally:
                fabric.stop(timeout=30)

    on1, on3 = phases[f"admission on, 1x"], phases[f"admission on, {args.factor:g}x"]
    off1, off3 = phases[f"admission off, 1x"], phases[f"admission off, {args.factor:g}x"]
    print()
    print(HEADER)
    for p in phases.values():
        print(row(p))
    print()
    checks = [
        (f"admitted calls' TTFT p95 <= SLO {slo:g}s at {args.factor:g}x (admission on): {on3.ttft_p95_s}s", on3.ttft_p95_s is not None and on3.ttft_p95_s <= slo),
        (f"refusals answered in < {REFUSAL_MS:g} ms (p99 {on3.refusal_p99_ms} ms over {on3.refused})", on3.refused > 0 and (on3.refusal_p99_ms or 0) < REFUSAL_MS),
        (f"every refusal carries Retry-After ({on3.refused_with_retry_after}/{on3.refused})", on3.refused_with_retry_after == on3.refused),
        (f"goodput at {args.factor:g}x >= at capacity (admission on): {on3.goodput_per_s:.2f} vs {on1.goodput_per_s:.2f}/s", on3.goodput_per_s >= GOODPUT_TOLERANCE * on1.goodput_per_s),
        (f"nothing else fails at {args.factor:g}x (admission on): {on3.failed} failed", on3.failed == 0),
    ]
    for text, ok in checks:
        print(("ok    " if ok else "FAIL  ") + text)
    ratio = on3.goodput_per_s / off3.goodput_per_s if off3.goodput_per_s else float("inf")
    print(f"goodput at {args.factor:g}x: admission on {on3.goodput_per_s:.2f}/s, off {off3.goodput_per_s:.2f}/s (on/off x{ratio:.1f}); "
          f"at capacity: on {on1.goodput_per_s:.2f}/s, off {off1.goodput_per_s:.2f}/s")  # fmt: skip
    print(f"TTFT p95 at {args.factor:g}x: admission on {on3.ttft_p95_s}s, off {off3.ttft_p95_s}s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overload_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"capacity_per_s": capacity, "slo_ttft_s": slo, "factor": args.factor, "phases": {k: v.as_dict() for k, v in phases.items()},
                                "checks": [{"check": t, "ok": ok} for t, ok in checks]}, indent=1))  # fmt: skip
    print(f"wrote {path}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
