"""Hotness-aware placement against round-robin on one agentic workload, on the live fabric.

Four models bundled on four nodes (loadtest/fleets/agentic.yaml): three 70B-class models
and an MoE, more than an 8-socket node holds in HBM at once. Sessions run an agent
flow -- planner, coder, reasoner, coder, summarizer -- each step's prompt carrying the
role's system prompt, the session's task and the history so far (prompts grow, and
share prefixes within a session and across sessions of one role).

The same workload (same seed) runs twice in one invocation, each against a fresh
`tierflow up` whose router uses one policy. For each it prints the share of requests
that found their model cold (not in HBM), client-side TTFT p50/p99, prefix-cache hit
share, and nodes touched per session; then the ratios round-robin / hotness-aware.

    .venv/bin/python loadtest/agentic_placement.py [--sessions 64 --concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openai

from tierflow.harness import start_fabric

HERE = Path(__file__).resolve().parent
FLOW = ("planner", "coder", "reasoner", "coder", "summarizer")
SYSTEM = {
    role: f"You are the {role} of a software agent team. " + f"Follow the {role} playbook to the letter. " * 40
    for role in set(FLOW)
}
TOPICS = ("billing service", "search index", "mobile app", "data pipeline", "auth gateway", "reporting tool", "chat widget", "payments API")


@dataclass
class Step:
    session: int
    role: str
    ttft: float
    tier: str
    node: str
    cached: int
    prompt: int
    started: float
    placement: str


@dataclass
class Run:
    policy: str
    steps: list[Step] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0


async def session(client: openai.AsyncOpenAI, sid: int, rng: random.Random, run: Run, max_tokens: int) -> None:
    task = f"Task {sid}: improve the {rng.choice(TOPICS)} " + " ".join(rng.choice(TOPICS) for _ in range(60))
    history: list[dict[str, str]] = []
    for role in FLOW:
        messages = [{"role": "system", "content": SYSTEM[role]}, {"role": "user", "content": task}, *history]
        started = time.monotonic()
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=role, messages=messages, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, user=f"session-{sid}", extra_body={"ignore_eos": True},
            )
            ttft, text, usage = None, [], None
            async for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft if ttft is not None else time.monotonic() - started
                    text.append(chunk.choices[0].delta.content)
                usage = chunk.usage or usage
        except openai.APIError:
            run.errors += 1
            return
        h = raw.headers
        run.steps.append(Step(sid, role, ttft or 0.0, h["x-tierflow-tier"], h["x-tierflow-node"],
                              usage.prompt_tokens_details.cached_tokens if usage else 0, usage.prompt_tokens if usage else 0, started, h.get("x-tierflow-placement", "")))
        history.append({"role": "assistant", "content": "".join(text)})
        history.append({"role": "user", "content": f"Next, the {role} result above is input for the next step."})


async def drive(base_url: str, policy: str, sessions: int, concurrency: int, seed: int, max_tokens: int) -> Run:
    run = Run(policy)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)

    async def one(sid: int) -> None:
        async with gate:
            await session(client, sid, random.Random(seed * 1000 + sid), run, max_tokens)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(sessions)))
    run.wall = time.monotonic() - started
    await client.close()
    return run


def summarize(run: Run) -> dict[str, float]:
    ttft = np.array([s.ttft for s in run.steps])
    per_session: dict[int, set[str]] = defaultdict(set)
    for s in run.steps:
        per_session[s.session].add(s.node)
    return {
        "requests": len(run.steps),
        "errors": run.errors,
        "cold_share": float(np.mean([s.tier != "hbm" for s in run.steps])),
        "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
        "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
        "prefix_hit_share": float(np.mean([s.cached > 0 for s in run.steps])),
        "nodes_per_session": float(np.mean([len(v) for v in per_session.values()])),
        "wall_s": run.wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--policies", default="hotness,round-robin")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results, runs = {}, {}
    for policy in args.policies.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            fabric = start_fabric(
                Path(tmp), "--fleet", str(HERE / "fleets/agentic.yaml"), "--deployment", "agents",
                "--decode-nodes", "4", "--prefill-nodes", "0", env={"TIERFLOW_PLACEMENT_POLICY": policy},
            )  # fmt: skip
            try:
                run = asyncio.run(drive(fabric.base_url, policy, args.sessions, args.concurrency, args.seed, args.max_tokens))
            finally:
                fabric.stop()
        results[policy] = summarize(run)
        runs[policy] = run
    cols = ("requests", "errors", "cold_share", "ttft_p50_ms", "ttft_p99_ms", "prefix_hit_share", "nodes_per_session", "wall_s")
    print(f"agentic workload: {args.sessions} sessions x {len(FLOW)} steps ({' -> '.join(FLOW)}), {args.concurrency} at a time")
    print(f"{'policy':<14}" + "".join(f"{c:>18}" for c in cols))
    for policy, r in results.items():
        print(f"{policy:<14}" + "".join(f"{r[c]:>18.3f}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    if {"hotness", "round-robin"} <= results.keys():
        h, rr = results["hotness"], results["round-robin"]
        ratio = lambda k: rr[k] / h[k] if h[k] else float("inf")  # noqa: E731  (inf: hotness found none cold)
        print(f"round-robin / hotness-aware: cold share {ratio('cold_share'):.2f}x, TTFT p99 {ratio('ttft_p99_ms'):.2f}x, "
              f"TTFT p50 {ratio('ttft_p50_ms'):.2f}x, nodes per session {ratio('nodes_per_session'):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"summary": results, "steps": {p: [vars(s) for s in r.steps] for p, r in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
