"""Two reports side by side (live against simulated, or policy A against policy B), with B/A ratios.

The ratio is coloured only where a metric has a better direction and B differs from A by
more than `NOTICEABLE` (green: B better, red: B worse), so a glance finds what moved. A
goodput comparison under different SLOs would mislead, so the caption says when they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec
from rich.table import Table
from rich.text import Text

from tierflow.workload.report import Report, Summary
from tierflow.workload.spec import Slo

__all__ = ["compare_table", "NOTICEABLE"]

NOTICEABLE = 0.05  # a ratio within 1 +- 5% is left uncoloured: run-to-run noise, not a change

Better = Literal["lower", "higher"] | None
Pick = Callable[[Summary], float | int | None]


class _Metric(msgspec.Struct, frozen=True):
    label: str
    pick: Pick
    unit: Literal["count", "ms", "share", "rps", "tokens", "nodes"]
    better: Better


_TOTALS: tuple[tuple[str, tuple[_Metric, ...]], ...] = (
    ("volume", (
        _Metric("requests", lambda s: s.requests, "count", None),
        _Metric("ok", lambda s: s.ok, "count", "higher"),
        _Metric("errors", lambda s: s.errors, "count", "lower"),
        _Metric("rejected", lambda s: s.rejected, "count", "lower"),
        _Metric("sessions", lambda s: s.sessions, "count", None),
    )),
    ("latency (ok requests)", (
        _Metric("TTFT p50", lambda s: s.ttft_ms.p50, "ms", "lower"),
        _Metric("TTFT p95", lambda s: s.ttft_ms.p95, "ms", "lower"),
        _Metric("TTFT p99", lambda s: s.ttft_ms.p99, "ms", "lower"),
        _Metric("ITL (TPOT) p50", lambda s: s.itl_ms.p50, "ms", "lower"),
        _Metric("ITL (TPOT) p95", lambda s: s.itl_ms.p95, "ms", "lower"),
        _Metric("ITL (TPOT) p99", lambda s: s.itl_ms.p99, "ms", "lower"),
        _Metric("E2E p50", lambda s: s.e2e_ms.p50, "ms", "lower"),
        _Metric("E2E p95", lambda s: s.e2e_ms.p95, "ms", "lower"),
        _Metric("E2E p99", lambda s: s.e2e_ms.p99, "ms", "lower"),
    )),
    ("goodput and rates", (
        _Metric("goodput share", lambda s: s.goodput_share, "share", "higher"),
        _Metric("goodput", lambda s: s.goodput_rps, "rps", "higher"),
        _Metric("throughput", lambda s: s.throughput_rps, "rps", "higher"),
        _Metric("input tokens", lambda s: s.input_tokens_per_s, "tokens", None),
        _Metric("output tokens", lambda s: s.output_tokens_per_s, "tokens", "higher"),
    )),
    ("cache and placement", (
        _Metric("cold share", lambda s: s.cold_share, "share", "lower"),
        _Metric("prefix hit rate", lambda s: s.prefix_hit_rate, "share", "higher"),
        _Metric("prefix hit share", lambda s: s.prefix_hit_share, "share", "higher"),
        _Metric("nodes per session", lambda s: s.nodes_per_session, "nodes", None),
        _Metric("nodes per session max", lambda s: s.nodes_per_session_max, "count", None),
    )),
)  # fmt: skip

_PER_MODEL: tuple[_Metric, ...] = (
    _Metric("requests", lambda s: s.requests, "count", None),
    _Metric("TTFT p95", lambda s: s.ttft_ms.p95, "ms", "lower"),
    _Metric("E2E p95", lambda s: s.e2e_ms.p95, "ms", "lower"),
    _Metric("goodput share", lambda s: s.goodput_share, "share", "higher"),
)


def _format(value: float | int | None, unit: str) -> str:
    if value is None:
        return "-"
    match unit:
        case "count":
            return f"{int(value):,}"
        case "ms":
            return f"{value:,.1f} ms"
        case "share":
            return f"{value:.1%}"
        case "rps":
            return f"{value:,.2f}/s"
        case "tokens":
            return f"{value:,.0f}/s"
        case _:
            return f"{value:.2f}"


def _ratio(a: float | int | None, b: float | int | None, better: Better) -> Text:
    if a is None or b is None or a == 0:
        return Text("-")
    ratio = b / a
    style = ""
    if better is not None and abs(ratio - 1.0) > NOTICEABLE:
        b_is_better = ratio < 1.0 if better == "lower" else ratio > 1.0
        style = "green" if b_is_better else "red"
    return Text(f"{ratio:.2f}x", style=style)


def _slo_text(slo: Slo) -> str:
    parts = [f"{name}<={value:g}" for name, value in (("ttft_ms", slo.ttft_ms), ("itl_ms", slo.itl_ms), ("e2e_ms", slo.e2e_ms)) if value is not None]
    return " ".join(parts) or "none"


def _label(tag: str, report: Report) -> str:
    return f"{tag}: {report.meta.source} {report.meta.policy}".rstrip()


def _add_rows(table: Table, metrics: tuple[_Metric, ...], a: Summary | None, b: Summary | None, prefix: str = "") -> None:
    for metric in metrics:
        left = None if a is None else metric.pick(a)
        right = None if b is None else metric.pick(b)
        table.add_row(prefix + metric.label, _format(left, metric.unit), _format(right, metric.unit), _ratio(left, right, metric.better))


def compare_table(a: Report, b: Report) -> Table:
    """Metric | A | B | B/A for the totals, then a few figures per model (models of either report)."""
    specs = a.meta.spec if a.meta.spec == b.meta.spec else f"{a.meta.spec} vs {b.meta.spec}"
    caption = [  # short lines: a caption wraps at the table's width; the spec is in the title
        f"A = {a.meta.source}, policy {a.meta.policy or '-'}, {a.meta.duration_s:g} s, started {a.meta.started_at or '-'}",
        f"B = {b.meta.source}, policy {b.meta.policy or '-'}, {b.meta.duration_s:g} s, started {b.meta.started_at or '-'}",
        f"SLO A: {_slo_text(a.slo)}   SLO B: {_slo_text(b.slo)}",
    ]
    if a.slo != b.slo:
        caption.append("the SLOs differ: goodput figures are not comparable")
    table = Table(title=f"workload report: {specs}", caption="\n".join(caption), caption_justify="left")
    table.add_column("metric")
    table.add_column(_label("A", a), justify="right")
    table.add_column(_label("B", b), justify="right")
    table.add_column("B/A", justify="right")
    for section, metrics in _TOTALS:
        table.add_row(Text(section, style="bold"), "", "", "")
        _add_rows(table, metrics, a.totals, b.totals, prefix="  ")
        table.add_section()
    for model in sorted(a.per_model.keys() | b.per_model.keys()):
        table.add_row(Text(f"model {model}", style="bold"), "", "", "")
        _add_rows(table, _PER_MODEL, a.per_model.get(model), b.per_model.get(model), prefix="  ")
    return table
