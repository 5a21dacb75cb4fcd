"""The placement suite: every traffic shape x two loads x the placement policies, in the simulator, in one table.

Issue 17 asks placement to be never worse than round-robin and far better where prefix
reuse is there to be had. This is the instrument that says whether it is, on our own
traffic (`loadtest/conversation_trace.py`'s shapes), not on the held-out traces:

- traffic: each shape of `conversation_trace.py` (`--shapes`), `--minutes` of it (a
  shorter window where the rate would send more than `--max-requests`: cheap requests
  saturate the fleet at hundreds a second, and the simulator runs about a thousand a
  second; the window each run got is in the table), on
  `loadtest/fleets/conversation-16.yaml` (16 sn40l-16 nodes, llama-3.1-8b and gpt-oss-20b
  at ss131072-bs4) through `loadtest/specs/conversation.yaml` (SLO: TTFT 2 s, ITL 100 ms),
  the autoscaler off, once per policy (`--policies`), the same requests every time;
- loads: `low` (25% of round-robin's saturation) and `high` (80% of it).
  Round-robin's saturation is the highest load at which round-robin serves at least 95%
  of the requests sent, ok and within the TTFT SLO, over the window. Load is the trace's
  rate: the shape's default rate times a scale, the trace generated at that rate (more
  conversations at once, every session n the same at every scale). Not the replay's
  `--rate-scale`: that sends a row's copies one after another, and round-robin's single
  turn counter then sends copy c of every row to the same node whenever the scale is a
  multiple of the node count (x16 on 16 nodes: round-robin "realized" the whole reuse),
  which flatters round-robin. The search: probe scale 1, then up by the room round-robin's
  chip utilisation leaves (to 90%, at least x1.25, at most x16) while it passes (down by
  halves while it fails), then bisections in log scale until the bracket is 1.2x wide;
  the highest passing scale is kept. The found scales
  go into the JSON (`saturation`), and `--saturation-from that.json` skips the search on
  a rerun with the same minutes, nodes, seed and model mapping; `--saturation 6` (or
  `chat=6,coding=12`) gives the scales outright;
- figures per run: TTFT p50/p95/p99, goodput (share of requests within every SLO), cold
  share, realized prefix reuse (cached / prompt tokens) against the reusable share (the
  replay's own figure: an unbounded cache per model, `tierflow.workload.trace_stats`),
  and nodes per conversation and per (conversation, model) (the report's figures with the
  records keyed by the row's conversation, which the router never sees unless
  `--router-sessions`);
- capacity: the prompt tokens of KV the fleet can hold, in HBM (the engine's KV pool,
  `DEFAULT_KV_CACHE_FRACTION` of each node's HBM) and in DDR (twice the pool, as the
  engine sizes it), per model, against the trace's reusable tokens per model: distinct
  (every 512-token block some later request of the model reuses) and at peak (blocks
  between their first and last use at once). A cache can hold the reuse when the peak
  live reusable KV fits in the fleet's HBM and DDR pools;
- checks, as PASS/FAIL lines: on every shape and load, hotness TTFT p95 <= round-robin's;
  hotness realizes >= 90% of the reusable share where the capacity allows it.

Runs go over `--jobs` processes (default 2, this machine's cores); the defaults (2 minutes,
at most 12,000 requests a run, four shapes, three policies) take about 3 minutes here,
2 of them finding the saturation. `--nodes 1000` runs the fleet rescaled to 1,000 nodes
with the trace rate scaled by 1000/16: give `--saturation` (the 16-node scales carry
over; the search there is hours) and raise `--max-requests`, or the windows shrink to
seconds.

    .venv/bin/python loadtest/placement_suite.py [--minutes 2] [--max-requests 12000] [--shapes conversation,tool-agent,coding,chat]
        [--policies hotness,round-robin,least-loaded] [--nodes 16] [--json loadtest/out/placement-suite.json]
        [--png loadtest/out/placement-suite.png] [--saturation-from loadtest/out/placement-suite.json]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conversation_trace import SHAPES, default_rate, for_file, generate
from tierflow.cli.sim import read_fleet, run_simulation, sim_report
from tierflow.rdu.engine import DEFAULT_KV_CACHE_FRACTION
from tierflow.sim import SimConfig
from tierflow.sim.fleet import plan_deployments
from tierflow.workload.records import RequestRecord
from tierflow.workload.replay import Replay, ReplayOptions, plan_replay
from tierflow.workload.spec import load_spec
from tierflow.workload.trace_export import write_trace
from tierflow.workload.traces import load_trace

FORMAT: Final = "tierflow-placement-suite/1"
BASE_NODES: Final = 16  # the shapes' default rates are for the 16-node fleet
LOADS: Final = {"low": 0.25, "high": 0.80}  # shares of round-robin's saturation
SATURATED_BELOW: Final = 0.95  # round-robin's share within the TTFT SLO that still counts as coping
REUSE_TARGET: Final = 0.90  # hotness must realize this share of the reusable prefix tokens
BLOCK: Final = 512


class Setup(msgspec.Struct, frozen=True, kw_only=True):
    """What every run of one suite shares; a cached saturation holds only for the same setup."""

    minutes: float
    max_requests: int  # a run's window ends sooner when the rate would send more than this
    nodes: int
    seed: int
    models: str  # "column": the generator's model per conversation; "prefix": the spec's mix, sticky by two blocks
    router_sessions: bool
    spec: str
    fleet: str
    out: str

    def key(self) -> dict[str, object]:
        return {
            "minutes": self.minutes,
            "max_requests": self.max_requests,
            "nodes": self.nodes,
            "seed": self.seed,
            "models": self.models,
            "router_sessions": self.router_sessions,
        }


class Probe(msgspec.Struct, frozen=True):
    scale: float
    within_ttft_slo: float
    utilisation: float


class Saturation(msgspec.Struct, frozen=True, kw_only=True):
    """Round-robin's saturation of one shape: the scale of the shape's default rate, the
    rate it makes (requests per second on the suite's fleet), and how it was found."""

    scale: float
    rate: float
    source: str  # "search", "given" or the JSON it came from
    probes: list[Probe] = []


class ModelCapacity(msgspec.Struct, frozen=True, kw_only=True):
    """One model: what the fleet's KV pools hold of it alone, and what the trace reuses of it (tokens)."""

    kv_bytes_per_token: int
    hbm_tokens: int
    ddr_tokens: int
    reusable_tokens: int
    peak_live_tokens: int


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """The fleet's KV pools (bytes) against the trace's reusable KV at its peak (bytes, all models)."""

    hbm_bytes: int
    ddr_bytes: int
    peak_live_bytes: int
    per_model: dict[str, ModelCapacity]

    @property
    def fits(self) -> bool:
        return self.peak_live_bytes <= self.hbm_bytes + self.ddr_bytes


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """One policy on one shape at one load: the table's row."""

    shape: str
    load: str
    scale: float
    policy: str
    requests: int
    rate: float
    window_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    goodput: float | None
    within_ttft_slo: float
    cold: float | None
    realized: float | None
    reusable: float | None
    reusable_blind: float | None
    nodes_per_conversation: float | None
    nodes_per_conversation_model: float | None
    utilisation: float
    capacity: Capacity
    wall_s: float


# --------------------------------------------------------------------------- one run


def _rate(setup: Setup, shape: str, scale: float) -> float:
    return default_rate(shape) * scale * setup.nodes / BASE_NODES


def window_s(setup: Setup, shape: str, scale: float) -> float:
    """The seconds of trace a run replays: `minutes`, or less where the rate would send more than `max_requests`."""
    return min(setup.minutes * 60.0, setup.max_requests / _rate(setup, shape, scale))


def _replay(setup: Setup, shape: str, scale: float) -> tuple[Replay, dict[str, str]]:
    """The replay of `shape` at `scale`, and each plan's session key -> its conversation.

    The trace goes to a file under `setup.out` (so `tierflow sim` can replay it too)."""
    seconds = window_s(setup, shape, scale)
    rows = generate(shape, seconds, setup.seed, _rate(setup, shape, scale))
    if not rows:
        raise SystemExit(f"{shape}: no request in {seconds:g} s at scale {scale:g}; give more --minutes")
    name = f"{shape}-x{scale:.4g}-{seconds:.0f}s-n{setup.nodes}-s{setup.seed}-{setup.models}{'-sessions' if setup.router_sessions else ''}.jsonl"
    path = write_trace(for_file(rows, model_column=setup.models == "column", sessions=setup.router_sessions), Path(setup.out) / "traces" / name)
    spec = load_spec(Path(setup.spec))
    replay = plan_replay(load_trace(path), spec, ReplayOptions(window_s=seconds, seed=spec.seed))
    conversation = {plan.session_key: rows[int(plan.session_id[1:].partition("x")[0]) - 1].session_id for plan in replay.plans}
    return replay, conversation


def capacity(setup: Setup, replay: Replay) -> Capacity:
    """The fleet's KV pools as the emulator sizes them (`NodeEngine`: KV_CACHE_FRACTION of
    HBM, DDR twice that up to half the DDR) against the replay's reusable blocks per model."""
    plans = plan_deployments(read_fleet(Path(setup.fleet)), nodes=setup.nodes)
    hbm = ddr = 0
    kv_bytes: dict[str, int] = {}
    for plan in plans:
        pool = int(plan.profile.hbm_capacity * DEFAULT_KV_CACHE_FRACTION)
        hbm += pool * plan.record.replicas
        ddr += max(0, min(2 * pool, plan.profile.ddr_capacity // 2)) * plan.record.replicas
        for entry, bundled in zip(plan.record.models, plan.bundle, strict=True):
            kv_bytes[entry.model] = bundled.spec.kv_bytes_per_token
    uses: dict[tuple[str, int], list[float]] = defaultdict(list)  # (model, block id) -> [first, last, count]
    for plan in replay.plans:
        prompt, model = plan.task_prompt, plan.calls[0].model
        assert prompt is not None
        for block in prompt.hash_ids[: prompt.tokens // BLOCK]:  # full blocks only: a partial one is the row's own
            seen = uses[(model, block)]
            if seen:
                seen[1], seen[2] = plan.start, seen[2] + 1
            else:
                seen += [plan.start, plan.start, 1]
    reusable: dict[str, int] = defaultdict(int)
    events: list[tuple[float, int, str]] = []
    for (model, _), (first, last, count) in uses.items():
        if count >= 2:
            reusable[model] += BLOCK
            events += [(first, 1, model), (last, -1, model)]
    events.sort(key=lambda e: (e[0], -e[1]))  # a block used again at the instant another ends is live in both
    live: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    live_bytes = peak_bytes = 0
    for _, step, model in events:
        live[model] += step * BLOCK
        live_bytes += step * BLOCK * kv_bytes.get(model, 0)
        peak[model] = max(peak[model], live[model])
        peak_bytes = max(peak_bytes, live_bytes)
    per_model = {
        model: ModelCapacity(
            kv_bytes_per_token=size,
            hbm_tokens=hbm // size,
            ddr_tokens=ddr // size,
            reusable_tokens=reusable.get(model, 0),
            peak_live_tokens=peak.get(model, 0),
        )
        for model, size in sorted(kv_bytes.items())
    }
    return Capacity(hbm_bytes=hbm, ddr_bytes=ddr, peak_live_bytes=peak_bytes, per_model=per_model)


def _within_ttft_slo(records: Sequence[RequestRecord], ttft_ms: float) -> float:
    """Requests ok with their first token within the SLO, as a share of all sent."""
    good = sum(1 for r in records if r.outcome == "ok" and r.first_token_at is not None and (r.first_token_at - r.sent_at) * 1e3 <= ttft_ms)
    return good / len(records) if records else 0.0


def simulate(setup: Setup, shape: str, load: str, scale: float, policy: str) -> Run:
    """Replay `shape` at `scale` with `policy`, the autoscaler off."""
    began = time.perf_counter()
    replay, conversation = _replay(setup, shape, scale)
    spec, fleet = load_spec(Path(setup.spec)), read_fleet(Path(setup.fleet))
    config = SimConfig(policy=policy, autoscale=False, nodes=setup.nodes)
    result = run_simulation(spec, fleet, config, plans=replay.plans)
    for record in result.records:  # the report counts nodes per conversation, whatever the router saw
        record.session_id = conversation.get(record.session_id, record.session_id)
    wall = time.perf_counter() - began
    report = sim_report(spec, result, config, wall_s=wall, started_at="", duration_s=replay.duration_s, trace=replay.summary)
    totals, ttft = report.totals, report.totals.ttft_ms
    return Run(
        shape=shape, load=load, scale=scale, policy=policy, requests=totals.requests, rate=totals.requests / replay.duration_s,
        window_s=replay.duration_s,
        ttft_p50_ms=ttft.p50, ttft_p95_ms=ttft.p95, ttft_p99_ms=ttft.p99, goodput=totals.goodput_share,
        within_ttft_slo=_within_ttft_slo(result.records, spec.slo.ttft_ms or math.inf), cold=totals.cold_share,
        realized=totals.prefix_hit_rate, reusable=replay.summary.sent.prefix_reuse, reusable_blind=replay.summary.source.prefix_reuse,
        nodes_per_conversation=totals.nodes_per_session, nodes_per_conversation_model=totals.nodes_per_session_model,
        utilisation=result.stats.utilisation, capacity=capacity(setup, replay), wall_s=wall,
    )  # fmt: skip


# --------------------------------------------------------------------------- saturation


def find_saturation(setup: Setup, shape: str, within: float = 1.2) -> Saturation:
    """Round-robin's saturation of `shape` (the module docstring's definition and search)."""
    probes: list[Probe] = []

    def probe(scale: float) -> bool:
        run = simulate(setup, shape, "probe", scale, "round-robin")
        probes.append(Probe(scale, run.within_ttft_slo, run.utilisation))
        return run.within_ttft_slo >= SATURATED_BELOW

    low, high, scale = 0.0, math.inf, 1.0
    for _ in range(12):
        if probe(scale):
            low = scale
            if high < math.inf:
                break
            scale *= min(16.0, max(1.25, 0.9 / max(probes[-1].utilisation, 1e-3)))  # utilisation grows with the rate
        else:
            high = scale
            if low > 0:
                break
            scale /= 2.0
    if low == 0.0:
        raise SystemExit(f"{shape}: round-robin misses the TTFT SLO even at {scale:g}x the default rate")
    while math.isfinite(high) and high / low > within:  # bisect (in log scale) until the bracket is `within` wide
        middle = math.sqrt(low * high)
        if probe(middle):
            low = middle
        else:
            high = middle
    return Saturation(scale=low, rate=_rate(setup, shape, low), source="search", probes=probes)


# --------------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _mtok(tokens: float) -> str:
    """Tokens in M (millions) or k."""
    return f"{tokens / 1e6:,.1f}M" if tokens >= 1e6 else f"{tokens / 1e3:,.0f}k"


COLUMNS: Final[tuple[tuple[str, int], ...]] = (
    ("shape", 12), ("load", 11), ("window", 6), ("policy", 12), ("req", 7), ("TTFT p50", 8), ("p95", 7), ("p99", 7), ("good", 6),
    ("cold", 5), ("realized", 8), ("reusable", 8), ("ratio", 5), ("nodes/conv", 10), ("/(conv,mdl)", 11),
    ("reuse live/distinct", 19), ("KV HBM/+DDR", 13),
)  # fmt: skip


def _line(cells: Sequence[str]) -> str:
    return "  ".join(
        cell.rjust(width) if i >= 4 or i == 2 else cell.ljust(width) for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
    )


def _mix_tokens(cap: Capacity, pool_bytes: int) -> float:
    """The pool in prompt tokens at the reused mix's mean KV bytes per token."""
    reusable = sum(m.reusable_tokens for m in cap.per_model.values())
    if reusable == 0:
        return pool_bytes / max(1, min(m.kv_bytes_per_token for m in cap.per_model.values()))
    per_token = sum(m.reusable_tokens * m.kv_bytes_per_token for m in cap.per_model.values()) / reusable
    return pool_bytes / per_token


def table(runs: Sequence[Run]) -> list[str]:
    """The one table: a row per run, shape and load in order."""
    lines = [_line([name for name, _ in COLUMNS]), _line(["-" * width for _, width in COLUMNS])]
    for run in runs:
        cap = run.capacity
        live = sum(m.peak_live_tokens for m in cap.per_model.values())
        distinct = sum(m.reusable_tokens for m in cap.per_model.values())
        ratio = "-" if run.realized is None or not run.reusable else f"{run.realized / run.reusable:.2f}"
        lines.append(_line([
            run.shape, f"{run.load} {run.rate:.1f}/s", f"{run.window_s:.0f} s", run.policy, f"{run.requests:,}", _ms(run.ttft_p50_ms), _ms(run.ttft_p95_ms),
            _ms(run.ttft_p99_ms), _pct(run.goodput), _pct(run.cold), _pct(run.realized), _pct(run.reusable), ratio,
            "-" if run.nodes_per_conversation is None else f"{run.nodes_per_conversation:.2f}",
            "-" if run.nodes_per_conversation_model is None else f"{run.nodes_per_conversation_model:.2f}",
            f"{_mtok(live)}/{_mtok(distinct)}", f"{_mtok(_mix_tokens(cap, cap.hbm_bytes))}/+{_mtok(_mix_tokens(cap, cap.ddr_bytes))}",
        ]))  # fmt: skip
    return lines


def capacity_notes(setup: Setup, runs: Sequence[Run]) -> list[str]:
    """Per model: the fleet's KV pools in tokens, and each shape and load's reusable tokens."""
    if not runs:
        return []
    first = runs[0].capacity
    lines = [
        f"KV pools ({setup.nodes} nodes, {DEFAULT_KV_CACHE_FRACTION:.0%} of HBM, DDR twice that): "
        + "; ".join(
            f"{model} {m.kv_bytes_per_token // 1024} KiB/token: HBM {_mtok(m.hbm_tokens)} tokens, DDR {_mtok(m.ddr_tokens)} (if alone)"
            for model, m in first.per_model.items()
        )
    ]
    seen: set[tuple[str, str]] = set()
    for run in runs:
        if (run.shape, run.load) in seen:
            continue
        seen.add((run.shape, run.load))
        cap = run.capacity
        share = cap.peak_live_bytes / cap.hbm_bytes if cap.hbm_bytes else math.inf
        lines.append(
            f"  {run.shape} {run.load}: reusable tokens at peak / distinct: "
            + ", ".join(f"{model} {_mtok(m.peak_live_tokens)} / {_mtok(m.reusable_tokens)}" for model, m in cap.per_model.items())
            + f"; peak reusable KV {share:.1%} of the HBM pools: {'fits' if cap.fits else 'does NOT fit'} in HBM + DDR"
        )
    return lines


def checks(runs: Sequence[Run]) -> list[tuple[bool | None, str]]:
    """Issue 17's checks: (passed, line); passed None when a check cannot apply (a policy missing, no room)."""
    by = {(r.shape, r.load, r.policy): r for r in runs}
    out: list[tuple[bool | None, str]] = []
    for shape, load in dict.fromkeys((r.shape, r.load) for r in runs):
        hot, rr = by.get((shape, load, "hotness")), by.get((shape, load, "round-robin"))
        if hot is None or rr is None or hot.ttft_p95_ms is None or rr.ttft_p95_ms is None:
            out.append((None, f"SKIP  {shape} {load}: TTFT p95 hotness <= round-robin (needs both policies)"))
        else:
            ok = hot.ttft_p95_ms <= rr.ttft_p95_ms
            out.append(
                (
                    ok,
                    f"{'PASS' if ok else 'FAIL'}  {shape} {load}: TTFT p95 hotness {hot.ttft_p95_ms:,.0f} ms <= round-robin {rr.ttft_p95_ms:,.0f} ms",
                )
            )
        if hot is None or hot.realized is None or not hot.reusable:
            out.append((None, f"SKIP  {shape} {load}: hotness reuse (no hotness run)"))
        elif not hot.capacity.fits:
            out.append((None, f"SKIP  {shape} {load}: hotness reuse: the peak reusable KV does not fit the fleet's pools"))
        else:
            ratio = hot.realized / hot.reusable
            ok = ratio >= REUSE_TARGET
            line = (
                f"{'PASS' if ok else 'FAIL'}  {shape} {load}: hotness realizes {hot.realized:.1%} of {hot.reusable:.1%} reusable "
                f"({ratio:.1%} of it, target {REUSE_TARGET:.0%}; the caches can hold it)"
            )
            out.append((ok, line))
    return out


def plot(runs: Sequence[Run], path: Path, title: str) -> Path:
    """Per shape: TTFT p95 (bars, p50 ticks) and realized reuse against the reusable share, per load and policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shapes = list(dict.fromkeys(r.shape for r in runs))
    policies = list(dict.fromkeys(r.policy for r in runs))
    loads = list(dict.fromkeys(r.load for r in runs))
    by = {(r.shape, r.load, r.policy): r for r in runs}
    figure = Figure(figsize=(4.2 * len(shapes), 7), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(shapes), squeeze=False)
    width = 0.8 / max(len(policies), 1)
    for col, shape in enumerate(shapes):
        ttft, reuse = axes[0][col], axes[1][col]
        for k, policy in enumerate(policies):
            xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(loads))]
            picked = [by.get((shape, load, policy)) for load in loads]
            p95 = [r.ttft_p95_ms if r is not None and r.ttft_p95_ms is not None else float("nan") for r in picked]
            p50 = [r.ttft_p50_ms if r is not None and r.ttft_p50_ms is not None else float("nan") for r in picked]
            ttft.bar(xs, p95, width, color=f"C{k}", label=f"{policy} p95")
            ttft.scatter(xs, p50, color="black", marker="_", s=200, zorder=3, label="p50" if k == 0 else None)
            realized = [r.realized if r is not None and r.realized is not None else float("nan") for r in picked]
            reuse.bar(xs, realized, width, color=f"C{k}", label=policy)
        for i, load in enumerate(loads):
            ceiling = next((r.reusable for r in runs if r.shape == shape and r.load == load and r.reusable is not None), None)
            if ceiling is not None:
                reuse.hlines(ceiling, i - 0.45, i + 0.45, colors="black", linestyles="--", label="reusable" if i == 0 else None)
        for ax in (ttft, reuse):
            ax.set_xticks(range(len(loads)), loads)
            ax.grid(True, axis="y", alpha=0.3)
        ttft.set_yscale("log")
        ttft.set_title(f"{shape}: TTFT")
        ttft.set_ylabel("ms (log)")
        reuse.set_title(f"{shape}: cached / prompt tokens")
        reuse.set_ylim(0, 1)
        if col == 0:
            ttft.legend(fontsize="small")
            reuse.legend(fontsize="small")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=90)
    return path


# --------------------------------------------------------------------------- main


def _given_saturation(text: str, shapes: Sequence[str]) -> dict[str, float]:
    """`6` (every shape) or `chat=6,coding=12`."""
    if "=" not in text:
        return dict.fromkeys(shapes, float(text))
    pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
    return {name.strip(): float(value) for name, value in pairs}


def _cached_saturation(path: Path, setup: Setup) -> dict[str, Saturation]:
    data = msgspec.json.decode(path.read_bytes())
    if data.get("format") != FORMAT:
        raise SystemExit(f"{path}: not a placement-suite JSON ({data.get('format')!r})")
    if data.get("setup_key") != setup.key():
        print(f"note: {path} was searched with {data.get('setup_key')}, this run is {setup.key()}: searching again")
        return {}
    return {shape: msgspec.convert({**found, "source": str(path)}, Saturation) for shape, found in data.get("saturation", {}).items()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"))


def _map(jobs: int, fn: Callable[..., object], calls: list[tuple[object, ...]]) -> list[object]:
    """`fn(*call)` for every call, over `jobs` processes (in this one when jobs is 1)."""
    if jobs <= 1 or len(calls) <= 1:
        return [fn(*call) for call in calls]
    with _pool(min(jobs, len(calls))) as pool:
        return list(pool.map(fn, *zip(*calls, strict=True)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="minutes of each trace (default 2)")
    parser.add_argument("--max-requests", type=int, default=12_000, help="a run's window shortens to send at most this many")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--policies", default="hotness,round-robin,least-loaded")
    parser.add_argument("--nodes", type=int, default=BASE_NODES, help="fleet size; the trace rate scales with it")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--models", choices=("column", "prefix"), default="column",
                        help="column: the generator's model per conversation; prefix: the spec's mix, sticky by two blocks")  # fmt: skip
    parser.add_argument("--router-sessions", action="store_true", help="send each conversation as the router's session")
    parser.add_argument("--saturation", default=None, help="round-robin's saturation as scales of the default rate: 6 or chat=6,coding=12")
    parser.add_argument("--saturation-from", type=Path, default=None, help="reuse the saturation a previous --json found")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check fails (default: 0, the table is the result)")
    parser.add_argument("--spec", type=Path, default=HERE / "specs" / "conversation.yaml")
    parser.add_argument("--fleet", type=Path, default=HERE / "fleets" / "conversation-16.yaml")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "placement-suite", help="where the traces go")
    parser.add_argument("--json", type=Path, default=HERE / "out" / "placement-suite.json")
    parser.add_argument("--png", type=Path, default=HERE / "out" / "placement-suite.png")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    setup = Setup(
        minutes=args.minutes, max_requests=args.max_requests, nodes=args.nodes, seed=args.seed, models=args.models, router_sessions=args.router_sessions,
        spec=str(args.spec), fleet=str(args.fleet), out=str(args.out),
    )  # fmt: skip

    saturation: dict[str, Saturation] = {}
    if args.saturation is not None:
        given = _given_saturation(args.saturation, shapes)
        saturation = {s: Saturation(scale=v, rate=_rate(setup, s, v), source="given") for s, v in given.items() if s in shapes}
    elif args.saturation_from is not None and args.saturation_from.exists():
        saturation = {s: found for s, found in _cached_saturation(args.saturation_from, setup).items() if s in shapes}
    missing = [s for s in shapes if s not in saturation]
    if missing:
        print(f"searching round-robin's saturation for {', '.join(missing)} ...", flush=True)
    found = _map(args.jobs, find_saturation, [(setup, shape) for shape in missing])
    saturation |= dict(zip(missing, found, strict=True))  # type: ignore[arg-type]
    searched_s = time.perf_counter() - began
    for shape in shapes:
        sat = saturation[shape]
        probes = ", ".join(f"x{p.scale:.3g}: {p.within_ttft_slo:.1%} (util {p.utilisation:.0%})" for p in sat.probes)
        print(f"{shape}: round-robin saturates at x{sat.scale:.3g} = {sat.rate:.2f} requests/s ({sat.source}){'; ' + probes if probes else ''}")

    calls = [
        (setup, shape, load, saturation[shape].scale * share, policy) for shape in shapes for load, share in LOADS.items() for policy in policies
    ]
    runs: list[Run] = _map(args.jobs, simulate, calls)  # type: ignore[assignment]
    wall_s = time.perf_counter() - began
    commit = _commit()
    title = (
        f"placement suite: {setup.minutes:g} min per trace (at most {setup.max_requests:,} requests), {setup.nodes} nodes ({Path(setup.fleet).name}), autoscale off, "
        f"seed {setup.seed}, models by {setup.models}{', router sessions' if setup.router_sessions else ''}; commit {commit}"
    )
    print()
    print(title)
    print("\n".join(table(runs)))
    print(
        "TTFT in ms; good: requests within every SLO (TTFT 2 s, ITL 100 ms); cold: model not in HBM; realized: cached / prompt "
        "tokens; reusable: the same with an unbounded cache per model; ratio: realized / reusable; nodes per conversation and "
        "per (conversation, model); reuse live/distinct: reusable prompt tokens at once at peak / in all; KV HBM/+DDR: the "
        "fleet's KV pools in prompt tokens at the reused mix's KV size"
    )
    print("\n".join(capacity_notes(setup, runs)))
    results = checks(runs)
    print()
    print("\n".join(line for _, line in results))
    print(f"wall time {wall_s:,.0f} s ({searched_s:,.0f} s finding saturation, {len(runs)} runs, {args.jobs} jobs)")
    document = {
        "format": FORMAT, "commit": commit, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": setup, "setup_key": setup.key(), "saturation": saturation, "runs": runs,
        "checks": [{"passed": ok, "line": line} for ok, line in results], "wall_s": wall_s,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n")
    print(f"wrote {args.json}")
    if args.png is not None and runs:
        print(f"wrote {plot(runs, args.png, title)}")
    return 1 if args.strict and any(ok is False for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
