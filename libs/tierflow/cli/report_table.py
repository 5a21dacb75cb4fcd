"""The summary table `tierflow loadtest run` and `tierflow sim` print: one row per model, then all."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from tierflow.workload.report import Report, Summary

__all__ = ["report_table"]

COLUMNS = ("req", "ok", "rej", "err", "TTFT\np50", "TTFT\np95", "ITL\np50", "E2E\np95", "good\nput", "cache\nhits", "cold", "tok/\nkWh")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"  # inter-token latencies are often ~1 ms


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _per_kwh(value: float | None) -> str:
    """Tokens per kWh (the requests' energy shares: `tierflow.rdu.energy`); "-" when none was reported."""
    if value is None:
        return "-"
    return f"{value / 1e6:,.1f}M" if value >= 1e6 else f"{value / 1e3:,.0f}k"


def _cells(s: Summary) -> tuple[str, ...]:
    return (
        str(s.requests), str(s.ok), str(s.rejected), str(s.errors), _ms(s.ttft_ms.p50), _ms(s.ttft_ms.p95),
        _ms(s.itl_ms.p50), _ms(s.e2e_ms.p95), _share(s.goodput_share), _share(s.prefix_hit_rate), _share(s.cold_share),
        _per_kwh(s.tokens_per_kwh),
    )  # fmt: skip


def report_table(report: Report, *, title: str, caption: str) -> Table:
    """Per model and in total (latencies in ms; cache hits and cold as shares)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
    table.add_column("model", no_wrap=True)
    for column in COLUMNS:
        table.add_column(column, justify="right", no_wrap=True)
    for name, summary in report.per_model.items():
        table.add_row(name, *_cells(summary))
    table.add_section()
    table.add_row("all", *_cells(report.totals))
    return table
