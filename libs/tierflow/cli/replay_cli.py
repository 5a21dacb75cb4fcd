"""The trace side of `tierflow loadtest run` and `tierflow sim`: `--trace` and its time controls, and the trace table.

Both commands take the same flags and print the same table, so a live replay and a
simulated one of the same trace read alike. Every problem is a message and exit 2
before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from tierflow.workload.replay import Replay
    from tierflow.workload.spec import WorkloadSpec
    from tierflow.workload.trace_stats import TraceStats, TraceSummary

__all__ = ["TraceOption", "FormatOption", "WindowOption", "SpeedOption", "plan_trace_replay", "trace_notes", "trace_table"]

TraceOption = Annotated[
    Path | None,
    typer.Option("--trace", help="replay this trace file (Mooncake/tierflow JSONL, Azure or BurstGPT CSV) instead of the spec's arrivals"),
]
FormatOption = Annotated[str | None, typer.Option("--format", help="the trace's format: mooncake, azure, burstgpt, tierflow (default: detected)")]
WindowOption = Annotated[
    str | None, typer.Option("--window", help="replay trace seconds START:DURATION from the first row, e.g. 600:600, 1h:10m, 30m: (to the end)")
]
SpeedOption = Annotated[float | None, typer.Option("--speed", min=0.001, help="replay the trace X times faster (0.5: half as fast)")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def plan_trace_replay(
    spec_path: Path,
    workload: WorkloadSpec,
    *,
    trace: Path | None,
    fmt: str | None,
    window: str | None,
    speed: float | None,
    rate_scale: float | None,
    seed: int | None,
    duration: float | None,
) -> Replay | None:
    """The replay the options ask for, or None for a synthetic run (no --trace, no `trace:`)."""
    from tierflow.workload.replay import ReplayError, parse_window, plan_replay, replay_options
    from tierflow.workload.spec import TRACE_FORMATS
    from tierflow.workload.traces import TraceError, load_trace

    section = workload.trace
    if trace is None and section is None:
        given = [flag for flag, value in (("--format", fmt), ("--window", window), ("--speed", speed)) if value is not None]
        if given:
            raise _fail(f"{', '.join(given)} only apply to a trace replay: give --trace FILE (or a `trace:` section in the spec)")
        return None
    if duration is not None:
        raise _fail("--duration (and --hours) cap a synthetic run; a trace replay's length is its window: use --window START:DURATION (trace seconds)")
    if fmt is not None and fmt not in TRACE_FORMATS:
        raise _fail(f"unknown --format {fmt!r}; choose one of {', '.join(TRACE_FORMATS)}")
    path = trace
    if path is None:
        assert section is not None
        if section.file is None:
            raise _fail(f"{spec_path}: the `trace:` section names no file; give --trace FILE or trace.file")
        path = Path(os.path.normpath(spec_path.parent / section.file))  # an absolute trace.file stays as it is
    if section is None and (workload.flows or workload.mix is not None):
        typer.echo(f"note: replaying {path}; the flows, mix and arrivals of {spec_path} are not used (its tenants and SLO are)", err=True)
    try:
        loaded = load_trace(path, format=fmt or (section.format if section is not None else None))  # type: ignore[arg-type]
        options = replay_options(
            section, seed=workload.seed if seed is None else seed, window=parse_window(window) if window is not None else None,
            speed=speed, rate_scale=rate_scale,
        )  # fmt: skip
        return plan_replay(loaded, workload, options)
    except (TraceError, ReplayError) as exc:
        raise _fail(str(exc)) from None


def trace_notes(summary: TraceSummary) -> dict[str, str | float | int]:
    """What a report's notes keep of how the trace was replayed."""
    return {
        "trace_file": summary.file, "trace_format": summary.format, "trace_window_start_s": summary.window_start_s,
        "trace_window_s": summary.window_s if summary.window_s is not None else "all", "trace_speed": summary.speed,
        "trace_rate_scale": summary.rate_scale,
    }  # fmt: skip


def _count(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _rows(n: int) -> str:
    return f"{n:,} row{'' if n == 1 else 's'}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def trace_table(summary: TraceSummary) -> Table:
    """The trace's own figures beside what the replay sent and what the run measured."""
    from rich import box
    from rich.table import Table

    window = f"from {summary.window_start_s:g} s" + (f" for {summary.window_s:g} s" if summary.window_s is not None else " to the end")
    notes = [
        f"{_rows(summary.zero_output_rows)} asking for no output tokens not sent",
        f"{_rows(summary.padded_rows)} shorter than the chat template padded to it",
    ]
    table = Table(
        title=(
            f"trace {summary.file} ({summary.format}, {summary.file_rows:,} rows over {summary.file_span_s:,.0f} s): "
            f"{window}, speed {summary.speed:g}x, rate scale {summary.rate_scale:g}x"
        ),
        caption="; ".join(notes) + "; requests per model: " + ", ".join(f"{m} {n:,}" for m, n in summary.models.items()),
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("", no_wrap=True)
    columns: list[TraceStats] = [summary.source, summary.sent] + ([summary.measured] if summary.measured is not None else [])
    for name in ("trace", "sent", "measured")[: len(columns)]:
        table.add_column(name, justify="right", no_wrap=True)
    rows: list[tuple[str, Callable[[TraceStats], str]]] = [
        ("requests", lambda s: _count(s.requests)),
        ("span (s)", lambda s: _count(s.span_s, 1)),
        ("rate mean (/s)", lambda s: _count(s.rate_mean, 2)),
        ("rate peak (/s)", lambda s: _count(s.rate_peak)),
    ]
    for side, pick in (("input", lambda s: s.input_tokens), ("output", lambda s: s.output_tokens)):
        rows += [
            (f"{side} tokens p50", lambda s, pick=pick: _count(pick(s).p50)),
            ("  p95", lambda s, pick=pick: _count(pick(s).p95)),
            ("  p99", lambda s, pick=pick: _count(pick(s).p99)),
            ("  mean", lambda s, pick=pick: _count(pick(s).mean)),
        ]
    rows.append(("prefix reuse", lambda s: _share(s.prefix_reuse)))
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in columns))
    return table
