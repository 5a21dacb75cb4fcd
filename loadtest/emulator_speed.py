"""How fast the RDU emulator runs in virtual time: one node, an hour of mixed traffic.

Drives one `NodeEngine` (sn40l-16, a bundle of three models) with Poisson arrivals:
prompts of 200-4000 tokens that open with one of a few shared system prompts, outputs of
50-1000 tokens, at a rate that keeps the chip busy but the queue stable. Runs the same
workload through both modes of the engine: with a `TokenGenerated` event per token (the
decode node's mode), and fast (`token_events=False`: starts and finishes only, a batch's
steps computed as one run; the simulator's mode). Prints, per mode, emulated seconds
against wall seconds, microseconds per request, and the fast mode's gain; and checks the
two modes started and finished every request at the same times.

As the router and the simulator do, the caller hashes each prompt (`block_hashes`, for
placement) and hands the hashes in with the request, outside the timed engine calls;
`--engine-hashes` leaves the hashing to the engine instead.

    python loadtest/emulator_speed.py [--duration 3600] [--rate 12] [--seed 1]
                                      [--mode both|tokens|fast] [--engine-hashes]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    BundleModel,
    DeploymentConfig,
    EngineEvent,
    EngineRequest,
    NodeEngine,
    RequestFinished,
    RequestStarted,
    TokenGenerated,
    block_hashes,
)

MIX = {"llama-3.1-8b": 0.5, "gpt-oss-120b": 0.3, "llama-3.1-70b": 0.2}
CONFIG = "ss8192-bs1-cb2-64"
# The queue diverges at about 24 requests/s with this mix; 12/s keeps the node busy
# (every model decoding most of the time, batches of a dozen and more) with a stable queue.
RATE = 12.0
N_SYSTEM_PROMPTS = 8


def arrivals(
    duration: float, rate: float, seed: int, *, block_size: int | None = None
) -> Iterator[tuple[float, EngineRequest]]:
    """Poisson arrivals; each prompt = a shared system prompt + a unique user turn.

    With `block_size`, each request carries its prompt's block hashes, as a router sends.
    """
    rng = np.random.default_rng(seed)
    systems = [
        rng.integers(0, 1 << 17, int(n)).tolist() for n in rng.integers(150, 1500, N_SYSTEM_PROMPTS)
    ]
    names, weights = list(MIX), np.array(list(MIX.values()))
    t, i = 0.0, 0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration:
            return
        system = systems[int(rng.integers(N_SYSTEM_PROMPTS))]
        total = int(rng.integers(200, 4001))
        shared = system[: total - 1]  # at least one token of the prompt is the user's own
        prompt = shared + rng.integers(0, 1 << 17, total - len(shared)).tolist()
        hashes = None if block_size is None else block_hashes(prompt, block_size)
        yield (
            t,
            EngineRequest(
                request_id=f"r{i}",
                model=names[int(rng.choice(len(names), p=weights))],
                prompt_token_ids=prompt,
                max_tokens=int(rng.integers(50, 1001)),
                seed=i,
                ignore_eos=True,
                prompt_block_hashes=hashes,
            ),
        )
        i += 1


@dataclass
class ModeRun:
    """One pass of the workload through one mode of the engine."""

    mode: str
    wall: float = 0.0  # the whole loop, making prompts (and hashing them) included
    in_engine: float = 0.0  # inside NodeEngine calls only
    submitted: int = 0
    served: int = 0
    tokens: int = 0  # completion tokens, from the finishes
    steps: int = 0  # decode steps with token events (tokens mode only)
    last: float = 0.0
    ttft: list[float] = field(default_factory=list)  # tokens mode only
    queue: list[float] = field(default_factory=list)
    tiers: dict[str, int] = field(default_factory=dict)
    milestones: list[EngineEvent] = field(default_factory=list)  # starts and finishes
    hit_share: float = 0.0


def run_mode(mode: str, args: argparse.Namespace) -> ModeRun:
    cfg = DeploymentConfig.parse(CONFIG)
    bundle = [BundleModel(BUILTIN_MODELS[name], cfg) for name in MIX]
    profile = BUILTIN_PROFILES["sn40l-16"]
    engine = NodeEngine(profile, bundle, now=0.0, token_events=mode == "tokens")
    out = ModeRun(mode)
    arrival_at: dict[str, float] = {}
    last_step = -1.0

    def consume(events: list[EngineEvent]) -> None:
        nonlocal last_step
        for ev in events:
            kind = type(ev)
            if kind is TokenGenerated:
                if ev.time != last_step:  # a batch step stamps all its tokens with one time
                    out.steps += 1
                    last_step = ev.time
                if ev.index == 0:
                    out.ttft.append(ev.time - arrival_at[ev.request_id])
                continue
            out.milestones.append(ev)
            if kind is RequestFinished:
                out.served += 1
                out.tokens += ev.completion_tokens
                out.last = ev.time
            elif kind is RequestStarted:
                out.queue.append(ev.queue_time)
                out.tiers[ev.tier] = out.tiers.get(ev.tier, 0) + 1

    # A simulator's loop: run the node up to each arrival, then hand it the request.
    clock = time.perf_counter
    block_size = None if args.engine_hashes else engine.block_size
    wall0 = clock()
    for t, req in arrivals(args.duration, args.rate, args.seed, block_size=block_size):
        c0 = clock()
        events = engine.advance(t)
        engine.submit(req, t)
        out.in_engine += clock() - c0
        consume(events)
        arrival_at[req.request_id] = t
        out.submitted += 1
    c0 = clock()
    events = engine.advance(math.inf)  # drain
    out.in_engine += clock() - c0
    consume(events)
    out.wall = clock() - wall0
    snap = engine.snapshot(out.last)
    out.hit_share = snap.prefix_cache_hits / max(1, snap.prefix_cache_queries)
    return out


def same_milestones(a: ModeRun, b: ModeRun) -> bool:
    """Every start and finish equal, times to 1e-9 relative."""
    if len(a.milestones) != len(b.milestones):
        return False
    for x, y in zip(a.milestones, b.milestones):
        if type(x) is not type(y) or x.request_id != y.request_id:
            return False
        if not math.isclose(x.time, y.time, rel_tol=1e-9) or (
            type(x) is RequestFinished and x.completion_tokens != y.completion_tokens
        ):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3600.0, help="emulated seconds of arrivals")
    ap.add_argument("--rate", type=float, default=RATE, help="mean arrivals per second")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", choices=("both", "tokens", "fast"), default="both")
    ap.add_argument(
        "--engine-hashes", action="store_true", help="the engine hashes prompts, not the caller"
    )
    args = ap.parse_args()

    modes = ("tokens", "fast") if args.mode == "both" else (args.mode,)
    runs = {mode: run_mode(mode, args) for mode in modes}

    first = next(iter(runs.values()))
    hashing = "the engine" if args.engine_hashes else "the caller, outside the engine calls"
    print(f"profile sn40l-16, bundle {', '.join(MIX)} ({CONFIG}), {args.rate:g}/s Poisson arrivals")
    print(f"emulated seconds   {args.duration:,.0f} of arrivals (last token at {first.last:,.1f})")
    print(f"requests served    {first.served:,} of {first.submitted:,}")
    print(f"prompts hashed by  {hashing}")
    print(f"tokens generated   {first.tokens:,} ({first.tokens / args.duration:,.0f}/s emulated)")
    print(f"weights found in   {first.tiers}")
    print(f"prefix cache hit   {first.hit_share:.0%} of looked-up tokens")
    q_ms = np.percentile(first.queue, [50, 99]) * 1e3
    print(f"queue time         p50 {q_ms[0]:,.0f} ms, p99 {q_ms[1]:,.0f} ms")
    if "tokens" in runs:
        tok = runs["tokens"]
        f_ms = np.percentile(tok.ttft, [50, 99]) * 1e3
        print(f"time to 1st token  p50 {f_ms[0]:,.0f} ms, p99 {f_ms[1]:,.0f} ms")
        print(f"decode batch       {tok.tokens / max(1, tok.steps):.1f} tokens per step on average")
    print()
    header = ("engine s", 10), ("wall s", 9), ("x real time", 13), ("(wall)", 9), ("us/request", 12)
    print(f"{'mode':<8}" + "".join(f"{name:>{width}}" for name, width in header))
    for r in runs.values():
        speed, wall_speed = args.duration / r.in_engine, args.duration / r.wall
        per_request = r.in_engine / max(1, r.submitted) * 1e6
        print(
            f"{r.mode:<8}{r.in_engine:>10,.2f}{r.wall:>9,.2f}{speed:>12,.0f}x{wall_speed:>8,.0f}x"
            f"{per_request:>12,.1f}"
        )
    if len(runs) == 2:
        tok, fast = runs["tokens"], runs["fast"]
        print(
            f"fast mode: {tok.in_engine / fast.in_engine:,.1f}x the tokens mode (engine alone);"
            f" same starts and finishes: {'yes' if same_milestones(tok, fast) else 'NO'}"
        )


if __name__ == "__main__":
    main()
