"""Figures of the front-door benchmark: medians over rounds, the table, the issue's checks.

Pure functions over `Run` records, so the table and the checks can be tested and
re-made from a `--json` file without running anything.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from .wrk import WrkResult

__all__ = ["Check", "Run", "Summary", "checks", "format_table", "summarize"]

TARGETS = ("direct", "vllm-router", "floor", "fabric")
CPU_ORDER = ("backend", "vllm-router", "router", "decode-node", "nats-server", "other")
ROUTER_GROUP = {
    "vllm-router": "vllm-router",
    "floor": "router",
    "fabric": "router",
}  # whose CPU is "the router's"


@dataclass
class Run:
    scenario: str
    target: str
    round: int
    wrk: WrkResult
    cpu: dict[str, float]  # CPU seconds per process group over the run

    @property
    def tokens(self) -> int:
        return self.wrk.counts.get("tokens", 0)

    def as_dict(self) -> dict:
        return {
            "scenario": self.scenario,
            "target": self.target,
            "round": self.round,
            "wrk": asdict(self.wrk),
            "cpu_seconds": self.cpu,
        }


@dataclass
class Summary:
    """Medians over the rounds of one (scenario, target)."""

    scenario: str
    target: str
    rounds: int
    rps: float
    rps_min: float
    rps_max: float
    p50: float
    p99: float
    tokens_per_s: float
    cpu_us_per_request: dict[str, float]
    cpu_us_per_token: dict[str, float]
    wrk_us_per_request: float
    failures: int = (
        0  # non-2xx, socket errors, or streams without [DONE], over all rounds
    )
    notes: list[str] = field(default_factory=list)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run]) -> dict[tuple[str, str], Summary]:
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        grouped.setdefault((run.scenario, run.target), []).append(run)
    out = {}
    for (scenario, target), rs in grouped.items():
        groups = sorted(
            {g for r in rs for g in r.cpu},
            key=lambda g: CPU_ORDER.index(g) if g in CPU_ORDER else 99,
        )
        per_req = {
            g: _median(
                [r.cpu.get(g, 0.0) / r.wrk.requests * 1e6 for r in rs if r.wrk.requests]
            )
            for g in groups
        }
        per_tok = (
            {
                g: _median([r.cpu.get(g, 0.0) / r.tokens * 1e6 for r in rs if r.tokens])
                for g in groups
            }
            if any(r.tokens for r in rs)
            else {}
        )
        failures = sum(
            max(
                r.wrk.non2xx,
                r.wrk.requests - r.wrk.counts.get("complete", r.wrk.requests),
            )
            + r.wrk.socket_errors
            for r in rs
        )
        rps = [r.wrk.rps for r in rs]
        out[(scenario, target)] = Summary(
            scenario, target, len(rs), _median(rps), min(rps), max(rps), _median([r.wrk.p50 for r in rs]), _median([r.wrk.p99 for r in rs]),
            _median([r.tokens / r.wrk.seconds for r in rs]) if any(r.tokens for r in rs) else 0.0,
            per_req, per_tok, _median([r.wrk.wrk_cpu / r.wrk.requests * 1e6 for r in rs if r.wrk.requests]), failures,
        )  # fmt: skip
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def format_table(
    summaries: dict[tuple[str, str], Summary], scenarios: list[str]
) -> str:
    """A Markdown table: one row per (scenario, path)."""
    lines = ["| load | path | req/s (min–max) | p50 | p99 | tokens/s | CPU µs per request | wrk µs/req |",
             "|---|---|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for scenario in scenarios:
        for target in TARGETS:
            s = summaries.get((scenario, target))
            if s is None:
                continue
            cpu = ", ".join(
                f"{g} {v:,.0f}"
                for g, v in s.cpu_us_per_request.items()
                if g != "other" or v >= 1
            )
            rng = (
                f"{s.rps:,.0f} ({s.rps_min:,.0f}–{s.rps_max:,.0f})"
                if s.rounds > 1
                else f"{s.rps:,.0f}"
            )
            tok = f"{s.tokens_per_s:,.0f}" if s.tokens_per_s else ""
            fail = f" **{s.failures} failed**" if s.failures else ""
            lines.append(
                f"| {scenario} | {target}{fail} | {rng} | {_ms(s.p50)} | {_ms(s.p99)} | {tok} | {cpu} | {s.wrk_us_per_request:,.0f} |"
            )
    return "\n".join(lines)


@dataclass
class Check:
    """One line of the issue's "What must hold": the figure, the bound, and whether it holds
    (None when a path was not measured)."""

    what: str
    value: str
    bound: str
    holds: bool | None

    def line(self) -> str:
        mark = {
            True: "holds",
            False: "FAILS",
            None: "n/a" if self.bound != "(reference)" else "",
        }[self.holds]
        return f"| {self.what} | {self.value} | {self.bound} | {mark} |"


def checks(
    summaries: dict[tuple[str, str], Summary], chat32: str, chat1: str, stream32: str
) -> list[Check]:
    get = summaries.get
    out: list[Check] = []
    fab, vr = get((chat32, "fabric")), get((chat32, "vllm-router"))
    if fab and vr:
        ratio = fab.rps / vr.rps
        out.append(
            Check(
                f"{chat32}: fabric req/s / vllm-router req/s",
                f"{ratio:.2f}x",
                ">= 1.3x",
                ratio >= 1.3,
            )
        )
        out.append(Check(f"{chat32}: fabric p99 / vllm-router p99", f"{fab.p99 / vr.p99:.2f}x ({_ms(fab.p99)} vs {_ms(vr.p99)})", "<= 1.0x",
                         fab.p99 <= vr.p99))  # fmt: skip
    else:
        out.append(
            Check(
                f"{chat32}: fabric req/s / vllm-router req/s",
                "not measured",
                ">= 1.3x",
                None,
            )
        )
    floor = get((chat32, "floor"))
    if floor and vr:
        ratio = floor.rps / vr.rps
        out.append(Check(f"{chat32}: floor req/s / vllm-router req/s (what the architecture reaches with no fabric work)",
                         f"{ratio:.2f}x, front door {floor.cpu_us_per_request.get('router', float('nan')):.0f} µs/request",
                         "(reference)", None))  # fmt: skip
    if fab:
        us = fab.cpu_us_per_request.get("router", float("nan"))
        vr_us = (
            f" (vllm-router {vr.cpu_us_per_request.get('vllm-router', float('nan')):.0f} µs)"
            if vr
            else ""
        )
        out.append(
            Check(
                f"{chat32}: tierflow router CPU per request",
                f"{us:.0f} µs{vr_us}",
                "< 120 µs",
                us < 120,
            )
        )
    fab1, direct1, vr1 = (
        get((chat1, "fabric")),
        get((chat1, "direct")),
        get((chat1, "vllm-router")),
    )
    if fab1 and direct1:
        added = fab1.p50 - direct1.p50
        vr_added = f" (vllm-router adds {_ms(vr1.p50 - direct1.p50)})" if vr1 else ""
        out.append(
            Check(
                f"{chat1}: fabric p50 added over direct",
                f"{_ms(added)}{vr_added}",
                "<= 1 ms",
                added <= 1e-3,
            )
        )
    fabs, vrs = get((stream32, "fabric")), get((stream32, "vllm-router"))
    if fabs:
        us = fabs.cpu_us_per_token.get("router", float("nan"))
        vr_us = (
            f" (vllm-router {vrs.cpu_us_per_token.get('vllm-router', float('nan')):.2f} µs)"
            if vrs and vrs.cpu_us_per_token
            else ""
        )
        out.append(
            Check(
                f"{stream32}: tierflow router CPU per token",
                f"{us:.2f} µs{vr_us}",
                "<= 5 µs",
                us <= 5,
            )
        )
    return out
