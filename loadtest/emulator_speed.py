"""How fast the RDU emulator runs in virtual time: one node, an hour of mixed traffic.

Drives one `NodeEngine` (sn40l-16, a bundle of three models) with Poisson arrivals:
prompts of 200-4000 tokens that open with one of a few shared system prompts, outputs of
50-1000 tokens, at a rate that keeps the chip busy but the queue stable. Prints emulated
seconds, wall seconds, their ratio, tokens generated and requests served.

    python loadtest/emulator_speed.py [--duration 3600] [--rate 12] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator

import numpy as np

from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    BundleModel,
    DeploymentConfig,
    EngineRequest,
    NodeEngine,
    RequestFinished,
    RequestStarted,
    TokenGenerated,
)

MIX = {"llama-3.1-8b": 0.5, "gpt-oss-120b": 0.3, "llama-3.1-70b": 0.2}
CONFIG = "ss8192-bs1-cb2-64"
# The queue diverges at about 24 requests/s with this mix; 12/s keeps the node busy
# (every model decoding most of the time, batches of a dozen and more) with a stable queue.
RATE = 12.0
N_SYSTEM_PROMPTS = 8


def arrivals(duration: float, rate: float, seed: int) -> Iterator[tuple[float, EngineRequest]]:
    """Poisson arrivals; each prompt = a shared system prompt + a unique user turn."""
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
        yield (
            t,
            EngineRequest(
                request_id=f"r{i}",
                model=names[int(rng.choice(len(names), p=weights))],
                prompt_token_ids=prompt,
                max_tokens=int(rng.integers(50, 1001)),
                seed=i,
                ignore_eos=True,
            ),
        )
        i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3600.0, help="emulated seconds of arrivals")
    ap.add_argument("--rate", type=float, default=RATE, help="mean arrivals per second")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    cfg = DeploymentConfig.parse(CONFIG)
    bundle = [BundleModel(BUILTIN_MODELS[name], cfg) for name in MIX]
    engine = NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=0.0)

    tokens = served = submitted = steps = 0
    last = -1.0
    arrival_at: dict[str, float] = {}
    ttft: list[float] = []
    queue: list[float] = []
    tiers: dict[str, int] = {}

    def consume(events: list) -> None:
        nonlocal tokens, served, steps, last
        for ev in events:
            kind = type(ev)
            if kind is TokenGenerated:
                tokens += 1
                if ev.time != last:  # a batch step stamps all its tokens with one time
                    steps += 1
                    last = ev.time
                if ev.index == 0:
                    ttft.append(ev.time - arrival_at.pop(ev.request_id))
            elif kind is RequestFinished:
                served += 1
                last = ev.time
            elif kind is RequestStarted:
                queue.append(ev.queue_time)
                tiers[ev.tier] = tiers.get(ev.tier, 0) + 1

    # A simulator's loop: run the node up to each arrival, then hand it the request.
    # `in_engine` times the NodeEngine calls alone; the rest is this script making prompts.
    clock = time.perf_counter
    in_engine = 0.0
    wall0 = clock()
    for t, req in arrivals(args.duration, args.rate, args.seed):
        c0 = clock()
        events = engine.advance(t)
        engine.submit(req, t)
        in_engine += clock() - c0
        consume(events)
        arrival_at[req.request_id] = t
        submitted += 1
    c0 = clock()
    events = engine.advance(math.inf)  # drain
    in_engine += clock() - c0
    consume(events)
    wall = clock() - wall0

    snap = engine.snapshot(last)
    q_ms = np.percentile(queue, [50, 99]) * 1e3
    f_ms = np.percentile(ttft, [50, 99]) * 1e3
    hits = snap.prefix_cache_hits / max(1, snap.prefix_cache_queries)
    print(f"profile sn40l-16, bundle {', '.join(MIX)} ({CONFIG}), {args.rate:g}/s Poisson arrivals")
    print(f"emulated seconds   {args.duration:,.0f} of arrivals (last token at {last:,.1f})")
    print(f"wall seconds       {wall:,.2f} ({in_engine:,.2f} inside NodeEngine calls)")
    speed, engine_speed = args.duration / wall, args.duration / in_engine
    print(f"speed              {speed:,.0f}x real time ({engine_speed:,.0f}x engine alone)")
    print(f"requests served    {served:,} of {submitted:,}")
    rate_emulated, rate_wall = tokens / args.duration, tokens / wall
    print(
        f"tokens generated   {tokens:,} ({rate_emulated:,.0f}/s emulated, {rate_wall:,.0f}/s wall)"
    )
    print(f"decode batch       {tokens / max(1, steps):.1f} tokens per step on average")
    print(f"queue time         p50 {q_ms[0]:,.0f} ms, p99 {q_ms[1]:,.0f} ms")
    print(f"time to 1st token  p50 {f_ms[0]:,.0f} ms, p99 {f_ms[1]:,.0f} ms")
    print(f"weights found in   {tiers}; prefix cache hit {hits:.0%} of looked-up tokens")


if __name__ == "__main__":
    main()
