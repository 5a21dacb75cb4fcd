"""The front door side by side: the fabric's HTTP path against a Rust router, in one run.

`wrk` (Debian's C load generator; 1 thread, keep-alive connections, a Lua script for the
POST body and, when streaming, for counting) drives four paths in turn:

  direct       a zero-compute OpenAI-shaped backend (loadtest/frontdoor/backend.py)
  vllm-router  vllm-router 0.1.17 (Rust) in front of that backend (a separate venv under
               /tmp/tierflow-bench, installed on first use; --skip-vllm-router without it)
  floor        the architecture with none of the fabric's work: HTTP -> NATS -> a bare
               responder (frontdoor/floor.py; --skip-floor without it), the ceiling any
               router on this path reaches here
  fabric       `tierflow up`: router -> NATS -> one decode node on the `zero` profile, no
               prefill node, anonymous HTTP; the fleet is loadtest/fleets/zero.yaml with 64
               batch slots (frontdoor/zero-c64.yaml: with zero.yaml's 4 the router's
               admission refuses most of 32 concurrent requests with 429)

under three loads: small chat completions (`max_tokens` 1) at 32 and at 1 connection, and
streamed 64-token chat completions (`ignore_eos`) at 32. Rounds rotate the paths (so the
machine's noise hits them alike) and the table shows medians: req/s, p50/p99, tokens/s,
and the CPU µs per request of each process (utime + stime deltas from /proc over the run
divided by requests: backend, vllm-router, the tierflow router process(es), the decode
node, nats-server, and `other` = tierflow up + registry + autoscaler), then the figures
issue 16's "What must hold" names. wrk measures whole responses, so TTFT is not here.

    .venv/bin/python loadtest/frontdoor.py [--seconds 5] [--rounds 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontdoor.procstat import CpuWindow
from frontdoor.report import Run, checks, format_table, summarize
from frontdoor.targets import (
    FLEET,
    MODEL,
    Target,
    check_answers,
    find_vllm_router,
    start_backend,
    start_fabric_target,
    start_floor,
    start_vllm_router,
)  # fmt: skip
from frontdoor.wrk import WRK, lua_script, run_wrk


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    stream: bool
    max_tokens: int

    @property
    def body(self) -> bytes:
        body: dict = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": self.max_tokens,
        }
        if self.stream:
            body |= {
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        return json.dumps(body, separators=(",", ":")).encode()


SCENARIOS = [
    Scenario("chat c=32", 32, False, 1),
    Scenario("chat c=1", 1, False, 1),
    Scenario("stream64 c=32", 32, True, 64),
]


def machine_note() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, load average {load} at start"


def tree_note() -> str:
    """Which fabric was measured: the commit, and whether services/ or libs/ differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "services", "libs"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "tree unknown (not a git checkout)"
    return f"tierflow at {head}" + (
        " + uncommitted changes in services/ or libs/" if dirty.strip() else ""
    )


def measure(
    targets: list[Target],
    scenarios: list[Scenario],
    seconds: int,
    rounds: int,
    warmup: int,
) -> list[Run]:
    runs: list[Run] = []

    def once(scenario: Scenario, target: Target, round_: int, duration: int) -> Run:
        window = CpuWindow(target.groups)
        result = run_wrk(target.url, lua_script(scenario.body, count_stream=scenario.stream), seconds=duration,
                         connections=scenario.connections, on_start=window.start, on_stop=window.stop)  # fmt: skip
        time.sleep(
            0.3
        )  # let the last in-flight requests drain before the next path starts
        return Run(scenario.name, target.name, round_, result, window.seconds)

    if warmup:
        print(f"warm-up: {warmup} s per path and load", flush=True)
        for scenario in scenarios:
            for target in targets:
                once(scenario, target, -1, warmup)
    for round_ in range(rounds):
        for scenario in scenarios:
            order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
            for target in order:
                run = once(scenario, target, round_, seconds)
                w = run.wrk
                extra = f", {run.tokens / w.seconds:,.0f} tok/s" if run.tokens else ""
                bad = (
                    f", {w.non2xx} non-2xx, {w.socket_errors} socket errors"
                    if not w.ok
                    else ""
                )
                print(f"  round {round_ + 1}/{rounds}  {scenario.name:14s} {target.name:12s} {w.rps:9,.0f} req/s  p50 {w.p50 * 1e3:6.2f} ms"
                      f"  p99 {w.p99 * 1e3:6.2f} ms{extra}{bad}", flush=True)  # fmt: skip
                runs.append(run)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds",
        type=int,
        default=5,
        help="wrk duration of each run (whole seconds)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds; each runs every path under every load once",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of unmeasured load per path and load first (0: none)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke: 1 s runs, 1 round"
    )
    parser.add_argument(
        "--skip-vllm-router", action="store_true", help="measure without vllm-router"
    )
    parser.add_argument(
        "--skip-floor", action="store_true", help="measure without the floor path"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="use vllm-router if found, never pip install it",
    )
    parser.add_argument(
        "--vllm-router",
        help="the vllm-router executable (default: $VLLM_ROUTER, /tmp/tierflow-bench/vllm-router-venv, PATH)",
    )
    parser.add_argument(
        "--vllm-policy",
        default="round_robin",
        help="vllm-router's --policy (one worker: round_robin is its cheapest)",
    )
    parser.add_argument(
        "--routers",
        type=int,
        default=1,
        help="tierflow up --routers: router processes sharing the port",
    )
    parser.add_argument(
        "--fleet",
        type=Path,
        default=FLEET,
        help="the fabric's fleet file (default: zero.yaml with 64 batch slots)",
    )
    parser.add_argument(
        "--json", type=Path, help="write every run and the summary here"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1, 1
    if not Path(WRK).exists():
        print(f"wrk not found at {WRK} (apt-get install wrk)", file=sys.stderr)
        return 2

    started = datetime.datetime.now().astimezone()
    notes = [
        f"{started:%Y-%m-%d %H:%M %Z}",
        machine_note(),
        f"wrk -t1, {args.seconds} s per run, {args.rounds} round(s), medians",
    ]
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="frontdoor-") as tmp:
        tmp_dir = Path(tmp)
        try:
            backend = start_backend(tmp_dir)
            targets.append(backend)
            if args.skip_vllm_router:
                notes.append("vllm-router skipped (--skip-vllm-router)")
            else:
                executable, why = find_vllm_router(
                    args.vllm_router, install=not args.no_install
                )
                notes.append(why if executable else f"vllm-router skipped: {why}")
                if executable:
                    targets.append(
                        start_vllm_router(
                            executable, backend, tmp_dir, args.vllm_policy
                        )
                    )
            if not args.skip_floor:
                targets.append(start_floor(tmp_dir))
            (tmp_dir / "fabric").mkdir()
            targets.append(
                start_fabric_target(
                    tmp_dir / "fabric", routers=args.routers, fleet=args.fleet
                )
            )
            for target in targets:
                for scenario in SCENARIOS:
                    if problem := check_answers(
                        target.url, scenario.body, scenario.stream
                    ):
                        raise RuntimeError(
                            f"{target.name} does not answer {scenario.name} correctly: {problem}"
                        )
                print(
                    f"{target.name:12s} {target.url}  pids {target.groups}  {target.note}",
                    flush=True,
                )
            runs = measure(targets, SCENARIOS, args.seconds, args.rounds, args.warmup)
        finally:
            for target in reversed(targets):
                target.stop()
    notes.append(
        "load average "
        + " ".join(Path("/proc/loadavg").read_text().split()[:3])
        + " at end"
    )
    summaries = summarize(runs)
    names = [s.name for s in SCENARIOS]
    found = checks(summaries, *names)
    print()
    print("Front door: " + "; ".join(notes))
    print()
    print(format_table(summaries, names))
    print()
    print("| issue 16 must hold | measured | bound | |\n|---|---|---|---|")
    print("\n".join(c.line() for c in found))
    if args.json:
        args.json.write_text(json.dumps({"notes": notes, "args": {k: str(v) for k, v in vars(args).items()}, "runs": [r.as_dict() for r in runs],
                                         "summary": [asdict(s) for s in summaries.values()], "checks": [asdict(c) for c in found]}, indent=1))  # fmt: skip
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
