"""Huge prompts beside streams: do they stall anyone else? (issue 14)

`tierflow up` on `loadtest/fleets/big-prompts.yaml` (the README's two models, two nodes,
continuous batching to 32 per model), then, in one run, three phases of
`--streams` (50) concurrent streams of `--tokens` (400) tokens each:

  baseline   the streams alone
  8 MiB      the same streams, and `--big` (5) requests whose prompt is 8 MiB of text,
             sent while the streams are flowing (their body is over the router's 8 MiB
             limit: they must be refused with 413 at once, before any tokenizing)
  7 MiB      the same with 7 MiB prompts: under the body limit, so the router reads and
             tokenizes them (in windows, stopping once the context is exceeded) and
             answers 400

The huge requests are sent by `curl` processes from pre-written files, so neither this
process's JSON encoding nor its GIL adds gaps to the streams it measures. Per phase it
prints the streams' inter-token latency (genai-perf's: a stream's time from its first
token to its last over the tokens between; p50 and p99 over the streams), the gaps
between two chunks as the client read them (p99, max), the big requests' statuses and
latencies, and what the router counted meanwhile:
`tierflow_router_retries_total{reason="node_lost"}`, migrations, and event-loop
wake-ups later than 100 ms. Each phase's p99 is compared with the baseline's in the
same run (a ratio: this machine is noisy); the issue's bar is 0 `node_lost` and a p99
inter-token latency under 200 ms beside the big prompts.

    .venv/bin/python loadtest/big_prompts.py [--streams 50] [--big 5] [--tokens 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from tierflow.harness import Fabric, start_fabric

MODELS = ("llama-3.1-8b", "gpt-oss-20b")
FLEET = Path(__file__).resolve().parent / "fleets" / "big-prompts.yaml"
ITL_BAR_S = 0.2


@dataclass
class Phase:
    name: str
    itls: list[float]
    gaps: list[float]
    completed: list[int]
    big: list[tuple[int, float]]
    node_lost: float
    migrations: float
    stalls: float


def _counters(fabric: Fabric) -> tuple[float, float, float]:
    scrape = fabric.scrape_router()  # one read: two reads of the live histogram race
    stalls = scrape.value("tierflow_event_loop_lag_seconds_count") - scrape.value("tierflow_event_loop_lag_seconds_bucket", le="0.1")
    return scrape.value("tierflow_router_retries_total", reason="node_lost"), scrape.value("tierflow_router_migrations_total"), stalls


def _big_body(path: Path, mib: float) -> Path:
    size = int(mib * 2**20)
    text = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    path.write_text(json.dumps({"model": MODELS[0], "messages": [{"role": "user", "content": text}], "max_tokens": 4}))
    return path


async def _curl(url: str, body: Path) -> tuple[int, float]:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
        "-H", "authorization: Bearer k", "--data-binary", f"@{body}", url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    return int(out or b"0"), time.monotonic() - started


async def _stream(client: openai.AsyncOpenAI, i: int, tokens: int, itls: list[float], gaps: list[float]) -> int:
    """One stream; appends its inter-token latency (genai-perf's: time from the first token
    to the last over the tokens between) and every gap between two chunks."""
    chunks = await client.chat.completions.create(
        model=MODELS[i % 2], messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    first = last = None
    n = 0
    async for chunk in chunks:
        now = time.monotonic()
        if chunk.choices:
            if last is not None:
                gaps.append(now - last)
            first, last = first or now, now
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    if first is not None and last is not None and n > 1:
        itls.append((last - first) / (n - 1))
    return n


async def _phase(fabric: Fabric, name: str, args: argparse.Namespace, body: Path | None) -> Phase:
    client = openai.AsyncOpenAI(base_url=fabric.base_url, api_key="k", max_retries=0, timeout=120)
    before = _counters(fabric)
    itls: list[float] = []
    gaps: list[float] = []
    streams = [asyncio.create_task(_stream(client, i, args.tokens, itls, gaps)) for i in range(args.streams)]
    big: list[tuple[int, float]] = []
    if body is not None:
        await asyncio.sleep(args.lead)  # the streams are flowing when the big ones arrive
        big = list(await asyncio.gather(*(_curl(f"{fabric.base_url}/chat/completions", body) for _ in range(args.big))))
    completed = list(await asyncio.gather(*streams))
    await client.close()
    after = _counters(fabric)
    return Phase(name, sorted(itls), sorted(gaps), completed, big, *(a - b for a, b in zip(after, before, strict=True)))


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _print(phases: list[Phase], args: argparse.Namespace) -> bool:
    print(f"\n{'phase':10} {'itl p50':>8} {'itl p99':>8} {'p99/base':>8} {'gap p99':>8} {'gap max':>8} {'complete':>9} {'node_lost':>9} {'migr':>5} {'stalls>100ms':>12}  big (status latency)")
    base = _pct(phases[0].itls, 0.99)
    ok = True
    for p in phases:
        p99 = _pct(p.itls, 0.99)
        complete = sum(1 for n in p.completed if n == args.tokens)
        big = ", ".join(f"{s} {t * 1000:.0f}ms" for s, t in p.big) or "-"
        print(f"{p.name:10} {_pct(p.itls, 0.5) * 1000:6.1f}ms {p99 * 1000:6.1f}ms {p99 / base:8.2f} {_pct(p.gaps, 0.99) * 1000:6.1f}ms "
              f"{(p.gaps[-1] if p.gaps else 0) * 1000:6.0f}ms {complete:>4}/{len(p.completed):<4} {p.node_lost:9.0f} {p.migrations:5.0f} {p.stalls:12.0f}  {big}")  # fmt: skip
        ok &= complete == len(p.completed) and p.node_lost == 0 and p99 < ITL_BAR_S
        ok &= all(status in (400, 413) for status, _ in p.big)
    print(f"\nitl: a stream's (last token - first token) / (tokens - 1), p50/p99 over the streams; gap: between two chunks as the client read them")
    print(f"bar: every stream complete, 0 node_lost, p99 inter-token latency < {ITL_BAR_S * 1000:.0f} ms, big prompts refused (400/413)")
    print("verdict:", "holds" if ok else "FAILS")
    return ok


async def _main(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory(prefix="tierflow-big-") as tmp:
        work = Path(tmp)
        bodies = {mib: _big_body(work / f"big-{mib}.json", mib) for mib in (8.0, 7.0)}
        (work / "fabric").mkdir()
        fabric = start_fabric(work / "fabric", "--fleet", str(FLEET), "--decode-nodes", "2", "--no-restart", "--actuator", "none")
        try:
            print(f"fabric up: {fabric.base_url}; {args.streams} streams x {args.tokens} tokens, {args.big} big prompts per phase")
            await _phase(fabric, "warm-up", argparse.Namespace(**{**vars(args), "streams": 4, "tokens": 8}), None)
            phases = [await _phase(fabric, "baseline", args, None)]
            for mib, body in bodies.items():
                phases.append(await _phase(fabric, f"{mib:g} MiB", args, body))
        finally:
            fabric.stop()
        return _print(phases, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--big", type=int, default=5, help="huge requests per phase")
    parser.add_argument("--tokens", type=int, default=400, help="tokens per stream")
    parser.add_argument("--lead", type=float, default=1.0, help="seconds the streams flow before the big requests")
    sys.exit(0 if asyncio.run(_main(parser.parse_args())) else 1)


if __name__ == "__main__":
    main()
