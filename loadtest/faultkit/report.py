"""One row per fault, the issue's "must"s judged on it, and the table.

A fault's window runs from the start of its steady period to the end of its recovery;
a call belongs to the window it *ended* in (a hung one: the window it was sent in), so a
call sent during one fault's recovery and broken by the next fault counts against the
next. Per window:

- `hung`: calls with no end within the client's hang timeout;
- `failed`, by why (`CallRecord.error`): refusals and errors before the stream, error
  events after it, broken connections, streams that ended with the wrong token count;
- `before_first`: failed calls that had not received a token (the issue: must be 0
  under kill -9), except, for a killed router, the calls whose connection it held (a
  router killed mid-stream loses its own connections: `router_conns`);
- `midstream`: calls whose node died under them after the first token: migrated (the
  router's record says so) or failed after their first token; `midstream_ok` of them
  ended ok with exactly `max_tokens` tokens (the issue: >= 99%);
- `migrated` / `retried`: ok calls the router moved to another node after / before the
  first token (its `migrations`, `attempts`), invisible to the client;
- registry writes sent, acknowledged and lost (`Ledger`);
- `back_s`: seconds from the fault until the throughput is back (`throughput_back`).

Throughput is tokens delivered per second, judged against what the calls sent asked for
at that moment: with open-loop arrivals the raw rate swings with the arrivals (+-30% in
5 s at this load), which would drown a fault's dip. So every call sent (whatever became
of it) adds its `max_tokens` to an *expected* timeline, spread from its send time plus
its model's median TTFT at its model's median tokens/s (both from the run's ok calls).
The ratio delivered / expected (5-s centred sums) sits near its steady-period level in
steady state (+-10% at this load); a fault pulls it down (stalled, failed or refused
calls). `back_s` is the time from the fault until the ratio is back to 85% of the steady
level after a dip below that which began within 10 s of the fault (0: no such dip; None:
not back within the window). A dip that begins later is arrival noise, not the fault's:
every effect of a fault here shows within seconds (1.5 s of silence, 3 missed beats).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .catalog import Fault, Injection
from .outage import WATCH_TO
from .ledger import Ledger
from .load import CallRecord, TokenBins
from .routerlog import RouterRecord

__all__ = ["Expected", "Row", "Window", "build_row", "format_table", "throughput_back"]

BACK_FRACTION = 0.85
SMOOTH_S = 5
DIP_ONSET_S = 10  # a dip that starts later than this after the fault is not the fault's
ALLOWED_OUTAGE_STATUSES = (429, 502, 503)


@dataclass
class Window:
    fault: Fault
    start: float  # steady period begins (wall clock)
    inject: float  # the fault strikes
    end: float  # recovery ends
    injection: Injection


@dataclass
class Row:
    fault: str
    title: str
    victim: str
    calls: int = 0
    ok: int = 0
    hung: int = 0
    failed: int = 0
    why: dict[str, int] = field(default_factory=dict)
    why_example: dict[str, str] = field(default_factory=dict)  # one message per `why`
    before_first: int = 0
    router_conns: int = 0
    midstream: int = 0
    midstream_ok: int = 0
    migrated: int = 0
    retried: int = 0
    writes: dict[str, int] = field(default_factory=dict)
    back_s: float | None = None
    victim_back_s: float | None = None
    steady_level: float = 0.0  # delivered / expected tokens over the steady period
    extra: dict[str, Any] = field(default_factory=dict)
    musts: list[tuple[str, bool]] = field(default_factory=list)
    window: tuple[float, float, float] = (0.0, 0.0, 0.0)  # steady start, fault, recovery end (wall clock)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.musts)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


class Expected:
    """Tokens per wall second the calls sent were asking for (see the module docstring)."""

    def __init__(self, calls: Sequence[CallRecord]) -> None:
        ok = [c for c in calls if c.outcome == "ok" and c.first is not None and c.done is not None and c.max_tokens > 1]
        by_model: dict[str, tuple[float, float]] = {}
        for model in {c.model for c in ok}:
            mine = [c for c in ok if c.model == model]
            ttft = float(np.median([c.first - c.sent for c in mine]))  # type: ignore[operator]
            rate = float(np.median([(c.max_tokens - 1) / max(1e-3, c.done - c.first) for c in mine]))  # type: ignore[operator]
            by_model[model] = (ttft, rate)
        fallback = (float(np.median([t for t, _ in by_model.values()])), float(np.median([r for _, r in by_model.values()]))) if by_model else (0.5, 10.0)
        self.bins: defaultdict[int, float] = defaultdict(float)
        for call in calls:
            ttft, rate = by_model.get(call.model, fallback)
            start = call.sent + ttft
            self._spread(start, start + call.max_tokens / rate, call.max_tokens)

    def _spread(self, start: float, end: float, tokens: float) -> None:
        second = int(start)
        span = max(end - start, 1e-6)
        while second < end:
            lo, hi = max(start, second), min(end, second + 1)
            if hi > lo:
                self.bins[second] += tokens * (hi - lo) / span
            second += 1

    def get(self, second: int) -> float:
        return self.bins.get(second, 0.0)


def _ratio_series(bins: TokenBins, expected: Expected, start: float, end: float) -> list[tuple[int, float | None]]:
    half = SMOOTH_S // 2
    out: list[tuple[int, float | None]] = []
    for second in range(int(start), int(end) + 1):
        got = sum(bins.bins.get(s, 0) for s in range(second - half, second + half + 1))
        want = sum(expected.get(s) for s in range(second - half, second + half + 1))
        out.append((second, got / want if want > 0 else None))
    return out


def throughput_back(bins: TokenBins, expected: Expected, steady_start: float, inject: float, end: float) -> tuple[float, float | None]:
    """(delivered/expected over the steady period, seconds from `inject` until back to
    BACK_FRACTION of it after a dip that began within DIP_ONSET_S: 0 if there was none,
    None if not back before `end`)."""
    got = sum(bins.bins.get(s, 0) for s in range(int(steady_start) + 1, int(inject)))
    want = sum(expected.get(s) for s in range(int(steady_start) + 1, int(inject)))
    level = got / want if want > 0 else 0.0
    if level <= 0:
        return level, None
    after = [(s, r) for s, r in _ratio_series(bins, expected, inject, end - SMOOTH_S) if r is not None]
    dip = next((i for i, (s, r) in enumerate(after) if r < BACK_FRACTION * level and s - inject <= DIP_ONSET_S), None)
    if dip is None:
        return level, 0.0
    back = next((s for s, r in after[dip:] if r >= BACK_FRACTION * level), None)
    return level, None if back is None else max(0.0, back - inject)


def _is_router_conn(call: CallRecord) -> bool:
    return call.outcome == "failed" and call.error.startswith("connection")


def build_row(window: Window, calls: Sequence[CallRecord], routers: dict[str, RouterRecord], ledger: Ledger, bins: TokenBins, expected: Expected) -> Row:
    fault, injection = window.fault, window.injection
    row = Row(fault.name, fault.title, injection.victim, victim_back_s=injection.back_s, window=(window.start, window.inject, window.end))
    row.extra.update({k: v for k, v in injection.facts.items() if k != "nodes_serving_s"})
    mine = [c for c in calls if window.start <= (c.done if c.done is not None else c.sent) < window.end]
    row.calls = len(mine)
    killed_router = fault.name == "router"
    why: Counter[str] = Counter()
    for call in mine:
        record = routers.get(call.request_id) if call.request_id else None
        if call.outcome == "ok":
            row.ok += 1
            if record is not None and record.migrations:
                row.migrated += 1
            elif record is not None and record.attempts > 1:
                row.retried += 1
        elif call.outcome == "hung":
            row.hung += 1
        else:
            row.failed += 1
            why[call.error] += 1
            if call.detail:
                row.why_example.setdefault(call.error, call.detail)
            if killed_router and _is_router_conn(call):
                row.router_conns += 1
            elif not call.had_first_token:
                row.before_first += 1
        died_midstream = (record is not None and record.migrations > 0) or (call.outcome != "ok" and call.had_first_token)
        if died_midstream and not (killed_router and _is_router_conn(call)):
            row.midstream += 1
            row.midstream_ok += call.outcome == "ok"
    row.why = dict(why.most_common())
    row.writes = ledger.summary(window.start, window.end)
    row.steady_level, row.back_s = throughput_back(bins, expected, window.start, window.inject, window.end)
    _judge(row, window, mine, routers)
    return row


def _judge(row: Row, window: Window, calls: Sequence[CallRecord], routers: dict[str, RouterRecord]) -> None:
    must = row.musts.append
    must(("0 hung", row.hung == 0))
    must(("0 registry writes lost", row.writes.get("lost", 0) == 0))
    kind = window.fault.kind
    if kind in ("kill", "stall"):
        must(("0 failures before the first token", row.before_first == 0))
        if row.midstream:
            must((">= 99% of mid-stream deaths complete, exact token count", row.midstream_ok >= 0.99 * row.midstream))
        if window.injection.back_s is None and kind == "kill":
            must((f"{row.victim} back", False))
    else:
        _judge_outage(row, window, calls, routers)


def _judge_outage(row: Row, window: Window, calls: Sequence[CallRecord], routers: dict[str, RouterRecord]) -> None:
    must = row.musts.append
    injection = window.injection
    bad = [c for c in calls if c.outcome == "failed" and not (c.status in ALLOWED_OUTAGE_STATUSES and c.error.startswith("http")) and not c.error.startswith("sse")]
    row.extra["failures_not_429_502_503_or_sse"] = dict(Counter(c.error for c in bad))
    must(("no 500", not any(c.status == 500 for c in calls if c.outcome != "ok")))
    must(("every failure a 429/502/503 or an SSE error event", not bad))
    serving: dict[str, float | None] = injection.facts.get("nodes_serving_s", {})
    row.extra["nodes_serving_s"] = serving
    must(("every node serves again within 10 s (a request sent straight to it)", bool(serving) and all(v is not None and v <= 10.0 for v in serving.values())))
    heard = injection.facts.get("routers_hear_every_node_s")
    must(("every router hears every node again within 10 s", heard is not None and heard <= 10.0))
    watch = watch_latency(injection, routers, _seq_len(WATCH_TO))
    row.extra["registry_watch_s"] = watch
    row.extra["change_acked_after_resume_s"] = None if injection.change_acked is None else round(injection.change_acked - injection.at, 2)
    routers_running = injection.facts.get("routers", len(watch))
    must((f"a registry change reaches every router within 2 s ({len(watch)} of {routers_running} asked)",
          len(watch) >= routers_running and all(v is not None and v <= 2.0 for v in watch.values())))  # fmt: skip
    resumed: dict[str, float | str] = injection.facts.get("router_log_watch_resumed_s", {})
    must(("registry watches resumed within 2 s (routers' logs)", all(v == "not down" or (isinstance(v, float) and v <= 2.0) for v in resumed.values())))


def watch_latency(injection: Injection, routers: dict[str, RouterRecord], new_value: int) -> dict[str, float | None]:
    """Per router: from the change's acknowledgement to the first answer it gave with the
    new value (the send time of that request: the router had the change by then), over
    the connections that landed on it; None when none of them ever saw it."""
    if injection.change_acked is None:
        return {}
    acked = injection.change_acked
    seen: dict[str, float | None] = {}
    for probe in injection.probes:
        record = routers.get(probe.request_id)
        if record is None:
            continue  # the connection broke before it was named
        first = next((sent for sent, value in probe.samples if value == new_value), None)
        held = seen.get(record.service)
        if first is None:
            seen.setdefault(record.service, None)
        else:
            latency = round(max(0.0, first - acked), 3)
            seen[record.service] = latency if held is None else min(held, latency)
    return seen


def _seq_len(config: str) -> int:
    return int(config.split("-")[0].removeprefix("ss"))


def _fmt(value: float | None, unit: str = "s") -> str:
    return "never" if value is None else f"{value:.1f}{unit}"


def format_table(rows: Sequence[Row]) -> str:
    head = ("fault", "calls", "hung", "failed", "before 1st", "mid-stream ok", "migrated/retried", "writes lost/acked", "tput back", "victim back", "must")
    lines = []
    table = [head]
    for r in rows:
        table.append((
            r.title, str(r.calls), str(r.hung), str(r.failed) + (f" ({r.router_conns} conn)" if r.router_conns else ""),
            str(r.before_first), f"{r.midstream_ok}/{r.midstream}" if r.midstream else "-", f"{r.migrated}/{r.retried}",
            f"{r.writes.get('lost', 0)}/{r.writes.get('acked', 0)}", _fmt(r.back_s), _fmt(r.victim_back_s) if r.victim_back_s is not None or r.title.startswith("kill") else "-",
            "ok" if r.passed else "FAIL",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    for r in rows:
        if r.why:
            lines.append(f"{r.title}: failed because " + ", ".join(f"{why} x{n}" for why, n in r.why.items()))
            for why, example in r.why_example.items():
                lines.append(f"  {why}: {example[:400]}")
        for text, ok in r.musts:
            if not ok:
                lines.append(f"{r.title}: MUST FAILED: {text}")
        for key, value in r.extra.items():
            if key in ("pid", "stopped_at", "routers"):
                continue
            lines.append(f"{r.title}: {key}: {value}")
    return "\n".join(lines)
