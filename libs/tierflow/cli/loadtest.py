"""`tierflow loadtest run | compare | export-trace`: drive a live fabric with a workload spec or a
trace; compare two reports; turn the router's request log into a replayable trace."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tierflow.cli.client_tls import cli_tls
from tierflow.cli.replay_cli import FormatOption, SpeedOption, TraceOption, WindowOption

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from tierflow.workload.live import LiveRun
    from tierflow.workload.report import Report
    from tierflow.workload.sessions import SessionPlan

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None)

DEFAULT_URL = "http://127.0.0.1:8000/v1"


@app.command("run")
def run(
    spec: Annotated[Path, typer.Argument(help="workload spec (YAML), e.g. loadtest/specs/agentic-small.yaml")],
    url: Annotated[str, typer.Option(help="OpenAI-compatible base URL of the fabric")] = DEFAULT_URL,
    grpc: Annotated[str | None, typer.Option("--grpc", help="send the calls over the router's gRPC Inference API at HOST:PORT (e.g. 127.0.0.1:50051) instead of HTTP")] = None,
    out: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("report.json"),
    plots: Annotated[Path | None, typer.Option(help="directory for PNG plots of the report (none when left out)")] = None,
    duration: Annotated[float | None, typer.Option(min=0.001, help="cap the run at S seconds (replaces the spec's duration_s)")] = None,
    rate_scale: Annotated[float | None, typer.Option(min=0.001, help="multiply every arrival rate by X (a trace: X times its rows, each keeping its tokens)")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="seed of the arrivals and texts (default: the spec's)")] = None,
    policy_label: Annotated[str, typer.Option(help="the fabric's placement policy, recorded in the report for `compare`")] = "unlabeled",
    trace: TraceOption = None,
    trace_format: FormatOption = None,
    window: WindowOption = None,
    speed: SpeedOption = None,
) -> None:
    """Run SPEC's sessions (or replay a trace with SPEC's mapping) against a live fabric; write a
    JSON report (and plots) and print a summary.

    Exits 2 when the spec, the trace or the fabric is unusable, 1 when no request succeeded.
    """
    from rich.console import Console

    from tierflow.cli.replay_cli import plan_trace_replay, trace_notes, trace_table
    from tierflow.workload.arrivals import run_length  # imported here: the CLI starts without numpy
    from tierflow.workload.report import ReportMeta, build_report, write_report
    from tierflow.workload.sessions import plan_sessions
    from tierflow.workload.spec import SpecError, load_spec

    console = Console(stderr=True)
    try:
        workload = load_spec(spec)
    except SpecError as exc:
        typer.echo(f"error: {spec}: {exc}", err=True)
        raise typer.Exit(2) from None
    replay = plan_trace_replay(
        spec, workload, trace=trace, fmt=trace_format, window=window, speed=speed, rate_scale=rate_scale, seed=seed, duration=duration
    )
    if replay is not None:
        plans, planned_s = replay.plans, replay.duration_s
        console.print(trace_table(replay.summary))  # what will be sent, before it is
    else:
        cap = duration if duration is not None else workload.duration_s
        planned_s = run_length(workload.arrivals, duration_s=cap)
        plans = plan_sessions(workload, seed=seed, duration_s=cap, rate_scale=rate_scale if rate_scale is not None else 1.0)
        if not plans:
            typer.echo(f"error: no session arrives within {planned_s:g} s; raise the rates or the duration", err=True)
            raise typer.Exit(2)
    _check_models(url, plans)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = _drive(plans, url, console, grpc)
    if result.stopped_early:
        typer.echo(f"stopped early: reporting the {len(result.records)} requests that finished, over {result.wall_s:.1f} s", err=True)
    notes: dict[str, str | float | int] = {
        "url": url, "spec_file": str(spec), "seed": workload.seed if seed is None else seed,
        "rate_scale": rate_scale if rate_scale is not None else 1.0,
        "sessions": len(plans), "planned_calls": result.progress.planned, "skipped_calls": result.progress.skipped,
        "max_start_lag_s": round(result.max_start_lag_s, 4), "stopped_early": int(result.stopped_early),
    }  # fmt: skip
    if replay is not None:
        notes |= trace_notes(replay.summary)
    meta = ReportMeta(
        spec=workload.name, source="live", policy=policy_label,
        duration_s=min(planned_s, result.wall_s) if result.stopped_early else planned_s,  # rates over the time load was offered
        wall_s=result.wall_s, started_at=started_at, notes=notes,
    )  # fmt: skip
    report = build_report(result.records, slo=workload.slo, meta=meta, trace=replay.summary if replay is not None else None)
    written = [write_report(report, out)]
    if plots is not None:
        from tierflow.workload.plots import write_plots

        written += write_plots(report, plots)
    if report.trace is not None:
        Console().print(trace_table(report.trace))
    Console().print(_summary_table(report))
    for path in written:
        typer.echo(f"wrote {path}")
    if report.totals.ok == 0:
        typer.echo("error: no request succeeded", err=True)
        raise typer.Exit(1)


def _check_models(url: str, plans: list[SessionPlan]) -> None:
    """Fail before the run, not a thousand times during it, when the fabric lacks a model or does not answer."""
    import openai

    from tierflow.workload.live import served_models

    wanted = {call.model for plan in plans for call in plan.calls}
    try:
        served = asyncio.run(served_models(url, plans[0].api_key, tls=cli_tls()))
    except openai.APIError as exc:
        typer.echo(f"error: cannot list the models at {url} ({exc}); is the fabric up (`tierflow up`)?", err=True)
        raise typer.Exit(2) from None
    missing = sorted(wanted - served)
    if missing:
        typer.echo(f"error: {url} does not serve {', '.join(missing)} (it serves: {', '.join(sorted(served)) or 'nothing'})", err=True)
        raise typer.Exit(2)


def _drive(plans: list[SessionPlan], url: str, console: Console, grpc_target: str | None = None) -> LiveRun:
    """The run, under a progress bar fed by the driver's callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tierflow.workload.live import LiveProgress, run_live

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("requests", total=sum(len(p.calls) for p in plans), status="")

        def show(p: LiveProgress) -> None:
            status = f"in flight {p.in_flight}  rejected {p.rejected}  errors {p.errors}" + (f"  skipped {p.skipped}" if p.skipped else "")
            bar.update(task, completed=p.done + p.skipped, status=status)

        async def until_interrupted() -> LiveRun:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C ends the run; what finished is reported
            try:
                return await run_live(plans, base_url=url, on_progress=show, stop=stop, grpc_target=grpc_target, tls=cli_tls())
            finally:
                loop.remove_signal_handler(signal.SIGINT)

        return asyncio.run(until_interrupted())


def _summary_table(report: Report) -> Table:
    from tierflow.cli.report_table import report_table

    meta = report.meta
    return report_table(
        report,
        title=f"{meta.spec}: live, policy {meta.policy}, {meta.duration_s:.4g} s of arrivals, {meta.wall_s:.1f} s wall",
        caption="latencies in ms; cache hits: prompt tokens found in the prefix cache; cold: served with the model not in HBM",
    )


@app.command("compare")
def compare(
    a: Annotated[Path, typer.Argument(help="report A: the JSON written by `tierflow loadtest run` or `tierflow sim`")],
    b: Annotated[Path, typer.Argument(help="report B, shown against A with the ratio B/A")],
) -> None:
    """Two reports side by side (live against simulated, or one policy against another)."""
    from rich.console import Console

    from tierflow.workload.compare import compare_table  # imported here: the CLI starts without numpy
    from tierflow.workload.report import ReportError, load_report

    try:
        left, right = load_report(a), load_report(b)
    except ReportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    Console().print(compare_table(left, right))


@app.command("export-trace")
def export_trace(
    router_log: Annotated[Path, typer.Argument(help="the router's log (JSON lines), e.g. .tierflow/logs/router.log")],
    out: Annotated[Path, typer.Option("-o", "--out", help="where to write the trace (tierflow's JSONL trace format)")] = Path("trace.jsonl"),
) -> None:
    """Write the requests the router logged as a trace that `loadtest run --trace` and `sim --trace` replay.

    One row per placed request: arrival (ms since the first), prompt and output tokens, the
    prompt's 512-token block ids, model, session and tenant. Exits 2 when the log holds no request.
    """
    from tierflow.workload.trace_export import export_router_log, write_trace

    try:
        with router_log.open("rb") as lines:
            exported = export_router_log(lines)
    except OSError as exc:
        typer.echo(f"error: cannot read {router_log}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    skipped = ", ".join(f"{n} {reason}" for reason, n in exported.skipped.items())
    if exported.unreadable_lines:
        typer.echo(f"note: {exported.unreadable_lines} lines of {router_log} are not log records; passed over", err=True)
    if not exported.rows:
        typer.echo(f"error: {router_log} holds no request record to export" + (f" (skipped: {skipped})" if skipped else ""), err=True)
        raise typer.Exit(2)
    write_trace(exported.rows, out)
    span_s = exported.rows[-1].timestamp / 1000.0
    typer.echo(f"wrote {out}: {len(exported.rows)} requests over {span_s:,.1f} s" + (f"; skipped {skipped}" if skipped else ""))
