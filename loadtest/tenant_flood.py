"""Two tenants, one flooding: does the steady one keep its latency? (issue 21)

One fabric (`loadtest/fleets/tenants.yaml`: one 8B model on two SN40L-16 nodes, 16 batch
slots), one router configuration with three tenants of equal weight, and three phases:

1. `alone`: the steady tenant's calls on their own, Poisson at `--steady-rps` (10/s; about
   2 in flight), open loop: its demand does not shrink when its calls get slower, so its
   goodput says what it was denied;
2. `flood`: the same, and beside it a second tenant's flood of `--flood` (48, 24x the
   steady tenant's concurrency) closed-loop clients, enough to saturate the batch slots;
3. `batch flood`: the steady calls ask for the interactive class (`service_tier:
   "priority"`) and the flood is a third tenant's, whose default class is batch.

Every call is a streamed chat completion through the official `openai` client (64 tokens,
`ignore_eos`). The flood runs in a child process with its own client, sharing this
machine's two cores as a real flood's clients would, and uses the client's default retry
on 429 (which honours Retry-After). For each phase it prints the steady tenant's TTFT
p50/p95/p99, its goodput (calls completed in full within the TTFT SLO), and what the flood
got (calls completed, refused). The judgement (issue 21), as ratios within one run
because the machine is noisy:

- steady TTFT p95 beside the flood <= `--bound` (1.5) x its value alone;
- steady goodput beside the flood >= 95% of its calls (its demand is below its fair share);
- interactive beside the batch flood: p95 inside the SLO (`--slo-ms`).

`--sim` runs the same three phases in `tierflow sim` (the same fleet and router
configuration, the router's admission on as live; open-loop arrivals, the flood at
`--sim-flood-rps`, 24x the steady rate),
judged with `--sim-bound` (1.2). Exit status 1 when a check fails.

    .venv/bin/python loadtest/tenant_flood.py [--seconds 30] [--steady-rps 10] [--flood 48]
    .venv/bin/python loadtest/tenant_flood.py --sim [--sim-seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import openai

from tierflow.harness import Fabric, start_fabric

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FLEET = HERE / "fleets" / "tenants.yaml"
MODEL = "chat"
PROMPT = "Summarize the quarterly report for the board in plain words. " * 12  # ~130 tokens

ROUTER_CONFIG = """\
tenants:
  - {name: steady, api_keys: [sk-steady], request_class: standard, max_class: interactive}
  - {name: flood, api_keys: [sk-flood], request_class: standard}
  - {name: bulk, api_keys: [sk-bulk], request_class: batch}
placement:
  policy: hotness
"""


@dataclass
class Calls:
    """What one tenant's clients saw in a phase."""

    ttft: list[float] = field(default_factory=list)  # seconds, completed calls only
    ok: int = 0
    refused: int = 0  # 429/503 that reached the caller (after the client's own retries)
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0  # open loop: calls sent

    def as_dict(self) -> dict[str, object]:
        return {"ttft": self.ttft, "ok": self.ok, "refused": self.refused, "failed": self.failed, "errors": self.errors}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _one(client: openai.AsyncOpenAI, calls: Calls, max_tokens: int, service_tier: str | None, *, pause: bool = True) -> None:
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            **({"service_tier": service_tier} if service_tier else {}),  # type: ignore[arg-type]
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as exc:
        key = f"{exc.status_code} {getattr(exc, 'code', '') or ''}".strip()
        calls.errors[key] = calls.errors.get(key, 0) + 1
        if exc.status_code in (429, 503):
            calls.refused += 1
        else:
            calls.failed += 1
        if pause:
            await asyncio.sleep(0.05)  # a refused closed-loop client does not spin
        return
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        key = type(exc).__name__
        calls.errors[key] = calls.errors.get(key, 0) + 1
        calls.failed += 1
        return
    if first is not None and tokens == max_tokens:
        calls.ok += 1
        calls.ttft.append(first - sent)
    else:
        calls.failed += 1


async def open_loop(base_url: str, key: str, rate: float, seconds: float, *, max_tokens: int, service_tier: str | None, seed: int) -> Calls:
    """Poisson arrivals at `rate` a second for `seconds`: the steady tenant's demand does
    not shrink when its calls get slower, so its goodput says what it was denied."""
    calls = Calls()
    pool = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=64), timeout=60.0)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, http_client=pool, max_retries=0, timeout=60.0)
    draw = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    at = 0.0
    try:
        while True:
            at += draw.expovariate(rate)
            if at >= seconds:
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, calls, max_tokens, service_tier, pause=False)))
        await asyncio.gather(*tasks)
    finally:
        await pool.aclose()
    calls.sent = len(tasks)
    return calls


async def closed_loop(base_url: str, key: str, concurrency: int, seconds: float, *, max_tokens: int, service_tier: str | None,
                      retries: int) -> Calls:  # fmt: skip
    """`concurrency` clients calling back to back for `seconds`."""
    calls = Calls()
    pool = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency), timeout=60.0)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, http_client=pool, max_retries=retries, timeout=60.0)
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            await _one(client, calls, max_tokens, service_tier)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await pool.aclose()
    return calls


def _flood_main(args: argparse.Namespace) -> None:
    calls = asyncio.run(closed_loop(args.url, args.key, args.concurrency, args.seconds, max_tokens=args.max_tokens,
                                    service_tier=args.service_tier or None, retries=2))  # fmt: skip
    Path(args.out).write_text(json.dumps(calls.as_dict()))


def _spawn_flood(url: str, key: str, concurrency: int, seconds: float, max_tokens: int, out: Path, service_tier: str = "") -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "--flood-worker", "--url", url, "--key", key, "--concurrency", str(concurrency),
            "--seconds", str(seconds), "--max-tokens", str(max_tokens), "--out", str(out), "--service-tier", service_tier]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO)


FLOOD_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
wrk.body = %(body)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; refused = 0; failed = 0; backoff = 0 end
-- A refused client waits before it calls again, as the openai client does on a 429
-- (it honours Retry-After; here one second): a flood is not a spin loop.
function delay() local d = backoff; backoff = 0; return d end
function response(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 429 or status == 503 then refused = refused + 1; backoff = 1000
  else failed = failed + 1 end
end
function done(summary, latency, requests)
  local t = {ok = 0, refused = 0, failed = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + thread:get(k) end
  end
  io.write(string.format("FLOOD ok=%%d refused=%%d failed=%%d\\n", t.ok, t.refused, t.failed))
end
"""


def _spawn_wrk_flood(url: str, key: str, concurrency: int, seconds: float, max_tokens: int, out: Path, service_tier: str = "") -> subprocess.Popen[bytes]:
    """The flood from Debian's `wrk` (C, one thread): the project's rule for load on 2 cores,
    so the flood's own client takes a few percent of a core, not most of one."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **({"service_tier": service_tier} if service_tier else {})}  # fmt: skip
    script = out.with_suffix(".lua")
    script.write_text(FLOOD_LUA % {"key": key, "body": json.dumps(json.dumps(body))})
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "--timeout", "30s", "-s", str(script), f"{url}/chat/completions"]
    return subprocess.Popen(argv, cwd=REPO, stdout=open(out.with_suffix(".wrk"), "w"), stderr=subprocess.STDOUT)


def _load(out: Path) -> Calls:
    wrk_out = out.with_suffix(".wrk")
    if wrk_out.exists():
        found = re.search(r"FLOOD ok=(\d+) refused=(\d+) failed=(\d+)", wrk_out.read_text())
        if found is None:
            raise RuntimeError("wrk printed no FLOOD line:\n" + wrk_out.read_text())
        return Calls(ok=int(found[1]), refused=int(found[2]), failed=int(found[3]))
    data = json.loads(out.read_text())
    return Calls(ttft=data["ttft"], ok=data["ok"], refused=data["refused"], failed=data["failed"], errors=data["errors"])


@dataclass
class Phase:
    name: str
    seconds: float
    steady: Calls
    flood: Calls | None

    def row(self, slo_s: float) -> dict[str, object]:
        good = sum(1 for t in self.steady.ttft if t <= slo_s)
        return {
            "phase": self.name,
            "steady_sent": self.steady.sent,
            "steady_goodput": good / max(1, self.steady.sent),
            "steady_calls": self.steady.ok,
            "steady_p50_ms": _pct(self.steady.ttft, 50) * 1e3,
            "steady_p95_ms": _pct(self.steady.ttft, 95) * 1e3,
            "steady_p99_ms": _pct(self.steady.ttft, 99) * 1e3,
            "steady_goodput_rps": good / self.seconds,
            "steady_refused": self.steady.refused,
            "steady_failed": self.steady.failed,
            "flood_ok": self.flood.ok if self.flood else 0,
            "flood_refused": self.flood.refused if self.flood else 0,
            "flood_failed": self.flood.failed if self.flood else 0,
            "flood_p95_ms": _pct(self.flood.ttft, 95) * 1e3 if self.flood else math.nan,
            "errors": {**self.steady.errors, **({f"flood {k}": v for k, v in self.flood.errors.items()} if self.flood else {})},
        }


async def _phase(fabric: Fabric, name: str, args: argparse.Namespace, tmp: Path, *, flood_key: str | None, steady_tier: str | None) -> Phase:
    url = fabric.base_url
    flood = None
    out = tmp / f"{name.replace(' ', '-')}.json"
    if flood_key is not None:
        spawn = _spawn_wrk_flood if args.flood_client == "wrk" else _spawn_flood
        flood = spawn(url, flood_key, args.flood, args.seconds + args.ramp_s, args.max_tokens, out)
        await asyncio.sleep(args.ramp_s)  # the flood fills the slots before the steady clients measure
    steady = await open_loop(url, "sk-steady", args.steady_rps, args.seconds, max_tokens=args.max_tokens, service_tier=steady_tier, seed=args.seed)
    flood_calls = None
    if flood is not None:
        await asyncio.to_thread(flood.wait, 120)
        flood_calls = _load(out)
    return Phase(name, args.seconds, steady, flood_calls)


def _print(rows: list[dict[str, object]]) -> None:
    head = f"{'phase':<12} {'calls':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'good/s':>7} {'refused':>8} | {'flood ok':>8} {'refused':>8} {'failed':>6} {'p95 ms':>8}"
    print(head)
    for r in rows:
        print(f"{r['phase']:<12} {r['steady_calls']:>6} {r['steady_p50_ms']:>8.1f} {r['steady_p95_ms']:>8.1f} {r['steady_p99_ms']:>8.1f} "
              f"{r['steady_goodput_rps']:>7.2f} {r['steady_refused']:>8} | {r['flood_ok']:>8} {r['flood_refused']:>8} {r['flood_failed']:>6} "
              f"{r['flood_p95_ms']:>8.1f}")  # fmt: skip
        if r["errors"]:
            print(f"{'':<12} errors: {r['errors']}")


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tenant-flood-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "router.yaml"
        config.write_text(ROUTER_CONFIG)
        (tmp / "data").mkdir()
        fabric = start_fabric(tmp / "data", "--fleet", str(FLEET), "--deployment", "chat", "--decode-nodes", "2", "--prefill-nodes", "0",
                              "--actuator", "none", env={"TIERFLOW_CONFIG": str(config)}, cwd=REPO)  # fmt: skip
        try:
            url = fabric.base_url
            await open_loop(url, "sk-steady", args.steady_rps, 3.0, max_tokens=args.max_tokens, service_tier=None, seed=0)  # warm-up
            phases = [
                await _phase(fabric, "alone", args, tmp, flood_key=None, steady_tier=None),
                await _phase(fabric, "flood", args, tmp, flood_key="sk-flood", steady_tier=None),
                await _phase(fabric, "batch flood", args, tmp, flood_key="sk-bulk", steady_tier="priority"),
            ]
        finally:
            fabric.stop()
    slo_s = args.slo_ms / 1e3
    rows = [p.row(slo_s) for p in phases]
    print(f"steady: Poisson {args.steady_rps:g}/s; flood: {args.flood} closed-loop clients; "
          f"{args.max_tokens}-token streams; {args.seconds:.0f} s a phase; TTFT SLO {args.slo_ms:.0f} ms")  # fmt: skip
    _print(rows)
    return _judge(rows, args, bound=args.bound)


def _judge(rows: list[dict[str, object]], args: argparse.Namespace, *, bound: float) -> int:
    alone, flood, batch = rows
    ratio = float(flood["steady_p95_ms"]) / float(alone["steady_p95_ms"])  # type: ignore[arg-type]
    goodput = float(flood["steady_goodput"])  # type: ignore[arg-type]
    checks = [
        (f"steady TTFT p95 beside the flood {ratio:.2f}x alone (bound {bound}x)", ratio <= bound),
        (f"steady goodput beside the flood {goodput:.1%} of its calls (bound 95%: its demand is under its share)", goodput >= 0.95),
        (f"interactive TTFT p95 beside a batch flood {float(batch['steady_p95_ms']):.0f} ms (SLO {args.slo_ms:.0f} ms)",  # type: ignore[arg-type]
         float(batch["steady_p95_ms"]) <= args.slo_ms),  # type: ignore[arg-type]
    ]
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": [{"check": t, "ok": ok} for t, ok in checks]}, indent=2, default=str))
    return 0 if all(ok for _, ok in checks) else 1


# ---------------------------------------------------------------------------- simulator

SIM_SPEC = """\
name: tenant-flood
seed: {seed}
duration_s: {seconds}
slo: {{ttft_ms: {slo_ms}, itl_ms: 200}}
tenants: {tenants}
mix:
  weight: 1
  prompt_tokens: {{mean: 130, sd: 0}}
  max_tokens: {{mean: {max_tokens}, sd: 0}}
  models: [{{model: chat, weight: 1}}]
arrivals:
  - {{kind: poisson, rate: {rate}, duration_s: {seconds}}}
"""


def _sim_phase(name: str, args: argparse.Namespace, *, flood: str | None, steady_class: str | None) -> dict[str, object]:
    """One phase in `tierflow sim`: open-loop arrivals (the simulator has no closed-loop
    clients), the flood at `--sim-flood-rps` beside the steady tenant's `--steady-rps`.
    The spec picks a tenant per call by weight, so weights are the two rates."""
    import logging

    import yaml

    from tierflow.cli.sim import read_fleet, run_simulation
    from tierflow.placement.admission import AdmissionConfig
    from tierflow.sim import SimConfig
    from tierflow.workload.spec import parse_spec

    steady = {"name": "steady", "api_key": "sk-steady", "weight": args.steady_rps, **({"request_class": steady_class} if steady_class else {})}
    tenants = [steady] + ([{"name": flood, "api_key": f"sk-{flood}", "weight": args.sim_flood_rps}] if flood else [])
    rate = args.steady_rps + (args.sim_flood_rps if flood else 0.0)
    spec = parse_spec(SIM_SPEC.format(seed=args.seed, seconds=args.sim_seconds, slo_ms=args.slo_ms, tenants=json.dumps(tenants),
                                      max_tokens=args.max_tokens, rate=rate))  # fmt: skip
    logging.getLogger("tierflow.placement.tenants").setLevel(logging.ERROR)  # the plain keys above are a benchmark's
    config = SimConfig(router_config=yaml.safe_load(ROUTER_CONFIG), admission=AdmissionConfig(), autoscale=False, seed=args.seed)
    result = run_simulation(spec, read_fleet(FLEET), config)
    mine = [r for r in result.records if r.tenant == "steady"]
    others = [r for r in result.records if r.tenant != "steady"]
    ttft = [r.first_token_at - r.sent_at for r in mine if r.outcome == "ok" and r.first_token_at is not None]
    slo_s = args.slo_ms / 1e3
    good = sum(1 for t in ttft if t <= slo_s)
    return {
        "phase": name, "steady_sent": len(mine), "steady_calls": len(ttft), "steady_goodput": good / max(1, len(mine)),
        "steady_p50_ms": _pct(ttft, 50) * 1e3, "steady_p95_ms": _pct(ttft, 95) * 1e3, "steady_p99_ms": _pct(ttft, 99) * 1e3,
        "steady_goodput_rps": good / args.sim_seconds, "steady_refused": sum(1 for r in mine if r.status in (429, 503)),
        "steady_failed": sum(1 for r in mine if r.outcome != "ok" and r.status not in (429, 503)),
        "flood_ok": sum(1 for r in others if r.outcome == "ok"), "flood_refused": sum(1 for r in others if r.status in (429, 503)),
        "flood_failed": sum(1 for r in others if r.outcome != "ok" and r.status not in (429, 503)),
        "flood_p95_ms": _pct([r.first_token_at - r.sent_at for r in others if r.first_token_at is not None], 95) * 1e3,
        "errors": {},
    }  # fmt: skip


def simulate(args: argparse.Namespace) -> int:
    rows = [
        _sim_phase("alone", args, flood=None, steady_class=None),
        _sim_phase("flood", args, flood="flood", steady_class=None),
        _sim_phase("batch flood", args, flood="bulk", steady_class="priority"),
    ]
    print(f"tierflow sim: steady Poisson {args.steady_rps:g}/s; flood Poisson {args.sim_flood_rps:g}/s; "
          f"{args.max_tokens}-token calls; {args.sim_seconds:.0f} s a phase; TTFT SLO {args.slo_ms:.0f} ms")  # fmt: skip
    _print(rows)
    return _judge(rows, args, bound=args.sim_bound)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per phase")
    parser.add_argument("--ramp-s", type=float, default=3.0, help="seconds the flood runs before the steady clients measure")
    parser.add_argument("--steady-rps", type=float, default=10.0, help="the steady tenant's Poisson arrival rate")
    parser.add_argument("--flood", type=int, default=48, help="the flood's closed-loop clients (24x the steady tenant's ~2 in flight)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--flood-client", choices=("wrk", "openai"), default="wrk",
                        help="the flood's client: Debian's wrk (C, the project's load generator) or openai (Python, ~1 core by itself)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slo-ms", type=float, default=1000.0, help="the TTFT SLO goodput and the interactive check are judged by")
    parser.add_argument("--bound", type=float, default=1.5, help="steady p95 beside the flood / alone must stay under this")
    parser.add_argument("--json", default="", help="write the rows and checks here")
    parser.add_argument("--sim", action="store_true", help="run the three phases in the simulator instead of live")
    parser.add_argument("--sim-seconds", type=float, default=120.0, help="simulated seconds per phase")
    parser.add_argument("--sim-flood-rps", type=float, default=240.0, help="the simulated flood's Poisson rate (24x the steady tenant's)")
    parser.add_argument("--sim-bound", type=float, default=1.2, help="the simulator's bound on steady p95 beside the flood / alone")
    # The flood's child process (internal).
    parser.add_argument("--flood-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--service-tier", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.flood_worker:
        _flood_main(arguments)
        sys.exit(0)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(simulate(arguments) if arguments.sim else asyncio.run(main(arguments)))
