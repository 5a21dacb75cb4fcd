"""Write an hour of agent traffic in Mooncake's trace format, shaped like Mooncake's tool & agent trace.

This machine cannot download the public traces, so the benchmarks replay a generated one
(the replay code path is the same: `tierflow.workload.traces` reads it as `mooncake`).
The targets are the published shape of Mooncake's tool & agent trace
(github.com/kvcache-ai/Mooncake, FAST25-release/traces/toolagent_trace.jsonl: 23,608
requests over one hour), with the means its paper (Qin et al., FAST'25) reports as we
recall them: about 8.6k input and 180 output tokens per request and most prompt blocks
reused. How the generator gets there:

- agent sessions arrive as a Poisson process whose rate swings +-30% over 20 minutes,
  with a one-minute burst at twice the rate every ten minutes (production traffic is
  neither flat nor smooth);
- each session runs under one of 40 agent templates (system prompt and tool
  definitions, 1-6 blocks of 512 tokens, popularity Zipf 1.1), then a task document
  (lognormal, median 3.5k tokens), then 1-12 turns (geometric, mean 1.8) ~15 s apart
  (exponential); each turn's prompt is the previous one plus the previous answer and a
  tool result (lognormal, median 1.5k tokens), so it re-sends the whole history, until
  the prompt would pass 28k tokens (a 32k context with room for the answer: the agent
  stops there, as agents compact or start over at their context limit);
- outputs are lognormal with median 120 tokens (mean ~180), at least 1;
- hash ids are Mooncake's: consecutive integers per distinct 512-token block, the last
  (partial) block included, so a turn shares the full blocks of the turn before it and
  every session shares its template's blocks.

    .venv/bin/python loadtest/mooncake_like_trace.py -o loadtest/out/mooncake-like.jsonl [--hours 1] [--seed 7]

prints the trace's requests, mean input and output tokens and the prefix reuse of its
hash_ids (`tierflow.workload.trace_stats`) so the shape can be checked against the targets.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import msgspec
import numpy as np

from tierflow.workload.spec import WorkloadSpec
from tierflow.workload.trace_export import write_trace
from tierflow.workload.traces import TraceRow, load_trace
from tierflow.workload.trace_stats import trace_stats

BLOCK = 512
TEMPLATES = 40
MAX_PROMPT = 28_000
SESSION_RATE = 3.25  # sessions per second at the swing's midpoint; with the bursts and ~1.8 turns: ~23,600 requests an hour


def _rate(t: np.ndarray) -> np.ndarray:
    """Sessions per second at `t`: a 20-minute swing and a one-minute burst every ten minutes."""
    swing = 1.0 + 0.3 * np.sin(2.0 * np.pi * t / 1200.0)
    burst = np.where(np.mod(t, 600.0) >= 540.0, 2.0, 1.0)
    return SESSION_RATE * swing * burst


def _session_starts(rng: np.random.Generator, seconds: float) -> np.ndarray:
    peak = SESSION_RATE * 1.3 * 2.0
    candidates = np.cumsum(rng.exponential(1.0 / peak, size=int(peak * seconds * 1.2) + 100))
    candidates = candidates[candidates < seconds]
    return candidates[rng.random(candidates.size) * peak < _rate(candidates)]  # thinning (Lewis and Shedler)


class HashIds:
    """Mooncake's hash ids: the next integer for every block never seen before."""

    def __init__(self) -> None:
        self.next = 0

    def fresh(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def generate(seconds: float = 3600.0, seed: int = 7) -> list[TraceRow]:
    """The rows of `seconds` of traffic, by arrival."""
    rng = np.random.default_rng(seed)
    ids = HashIds()
    template_blocks = [ids.fresh(int(rng.integers(1, 7))) for _ in range(TEMPLATES)]
    popularity = 1.0 / np.arange(1, TEMPLATES + 1) ** 1.1
    popularity /= popularity.sum()
    requests: list[tuple[float, int, TraceRow]] = []
    for session, start in enumerate(_session_starts(rng, seconds).tolist()):
        template = template_blocks[int(rng.choice(TEMPLATES, p=popularity))]
        length = len(template) * BLOCK + int(rng.lognormal(math.log(3500), 0.8))
        blocks = list(template)  # ids of the prompt's full blocks so far
        turns = int(rng.geometric(0.55))
        t = start
        for _ in range(min(turns, 12)):
            if length > MAX_PROMPT:
                break
            full = length // BLOCK
            blocks += ids.fresh(full - len(blocks))  # the blocks this turn filled are new text
            partial = ids.fresh(1) if length % BLOCK else []  # the last, partial block is this turn's own
            output = max(1, int(rng.lognormal(math.log(120), 0.9)))
            if t < seconds:
                row = TraceRow(timestamp=round(t * 1000.0), input_length=length, output_length=output, hash_ids=blocks + partial)
                requests.append((t, session, row))
            length += output + int(rng.lognormal(math.log(1500), 0.7))
            t += float(rng.exponential(15.0))
    requests.sort(key=lambda r: (r[0], r[1]))
    return [row for _, _, row in requests]


def spec_trace_file(spec_path: Path, spec: WorkloadSpec) -> Path:
    """The trace file a spec's `trace:` section names (relative to the spec), written from
    `generate` (the hour, seed 7) on first use: the benchmarks that replay it call this."""
    assert spec.trace is not None and spec.trace.file is not None
    trace_file = (spec_path.parent / spec.trace.file).resolve()
    if not trace_file.exists():
        write_trace(generate(3600.0, seed=7), trace_file)
    return trace_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, default=Path("loadtest/out/mooncake-like.jsonl"))
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    write_trace(generate(args.hours * 3600.0, args.seed), args.out)
    trace = load_trace(args.out)
    stats = trace_stats(trace.time_s, trace.input_tokens, trace.output_tokens, trace.hash_ids)
    print(f"wrote {args.out}: {msgspec.json.encode(stats).decode()}")


if __name__ == "__main__":
    main()
