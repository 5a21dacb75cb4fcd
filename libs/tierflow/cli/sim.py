"""`tierflow sim SPEC --fleet FLEET`: a workload spec on a simulated fleet, in virtual time.

The shell around `tierflow.sim`: it reads the files, runs the simulation (split over
worker processes with `--workers`, see `tierflow.sim.shards`), shows progress, measures
the wall time the simulator itself never reads, and writes the same report (and plots)
as `tierflow loadtest run`, so `tierflow loadtest compare` puts the two side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tierflow.cli.replay_cli import FormatOption, SpeedOption, TraceOption, WindowOption

if TYPE_CHECKING:
    from rich.table import Table

    from tierflow.sim import FleetRecords, SimConfig, SimResult
    from tierflow.sim.result import SimStats
    from tierflow.workload.report import Report
    from tierflow.workload.sessions import SessionPlan
    from tierflow.workload.spec import WorkloadSpec
    from tierflow.workload.trace_stats import TraceSummary

__all__ = ["sim", "read_fleet", "read_router_config", "run_simulation", "sim_report", "summary_table"]

POLICY_NAMES = ("hotness", "round-robin", "least-loaded", "random")


def read_fleet(path: Path) -> FleetRecords:
    """The fleet file as the registry would hold it; FleetError lists every problem by path."""
    from tierflow.services.model_registry.fleet import load_fleet, to_records
    from tierflow.sim import FleetRecords

    state = to_records(load_fleet(path))
    return FleetRecords(models=dict(state.models), deployments=list(state.deployments.values()))


def read_router_config(path: Path | None) -> dict[str, Any]:
    """The router's configuration file (tenants, placement), as `tierflow router --config` reads it."""
    if path is None:
        return {}
    from tierflow.services.router.config import read_router_config as read

    return read(path)


# The parts of the run being simulated, for the worker processes to read: they are forked
# after this is set, so they inherit it instead of being sent hundreds of thousands of
# session plans through a pipe.
_PARTS: list[tuple[WorkloadSpec, FleetRecords, SimConfig, frozenset[str], list[SessionPlan] | None]] = []
_NICENESS = [0]  # the parent's, which the costliest part keeps


def _run_part(index: int) -> bytes:
    """One part, in a worker process; the result travels back as msgpack (fast to move).

    Parts come costliest first (`partition`), and every part after the first runs at a
    lower priority: with more parts than cores, the costliest one, which decides when the
    run ends, keeps a core to itself, and the others share what is left, then every core
    once it is done (longest job first)."""
    import os

    import msgspec

    from tierflow.sim import Simulation

    try:  # a worker may run a second part: set its priority, do not just lower it
        os.setpriority(os.PRIO_PROCESS, 0, _NICENESS[0] + (10 if index else 0))
    except PermissionError:  # raising it back needs privilege: that part only runs slower
        pass
    spec, fleet, config, part, plans = _PARTS[index]
    return msgspec.msgpack.encode(Simulation(spec, fleet, config, part=part, sessions=plans).run())


def run_simulation(
    spec: WorkloadSpec,
    fleet: FleetRecords,
    config: SimConfig,
    *,
    workers: int = 1,
    progress: Callable[[float], None] | None = None,
    plans: list[SessionPlan] | None = None,
) -> SimResult:
    """Simulate in this process, or split into independent parts over `workers` processes
    (as many as the fleet has independent deployment groups, at most) and merge.
    `plans`: a trace replay's sessions, run instead of the spec's arrivals."""
    from tierflow.sim import Simulation, prepare
    from tierflow.sim.loop import rare_collections
    from tierflow.sim.shards import merge, partition, sessions_of

    parts = partition(spec, fleet.deployments, workers, router_config=config.router_config, sessions=plans)
    if len(parts) == 1:
        return Simulation(spec, fleet, config, sessions=plans).run(progress)
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import msgspec

    from tierflow.sim import SimResult

    prepare(spec, fleet, config, sessions=plans)  # a bad spec or fleet fails here, once, not in every worker
    _NICENESS[0] = os.getpriority(os.PRIO_PROCESS, 0)
    _PARTS[:] = [(spec, fleet, config, part, sessions_of(part, fleet.deployments, plans) if plans is not None else None) for part in parts]
    try:
        with ProcessPoolExecutor(max_workers=len(parts), mp_context=multiprocessing.get_context("fork")) as pool:
            encoded = list(pool.map(_run_part, range(len(parts))))
    finally:
        _PARTS.clear()
    with rare_collections():  # decoding the parts' records allocates millions of objects
        return merge([msgspec.msgpack.decode(data, type=SimResult) for data in encoded])


def sim(
    spec: Annotated[Path, typer.Argument(help="workload spec (YAML), e.g. loadtest/specs/fleet-1000.yaml")],
    fleet: Annotated[Path, typer.Option("--fleet", help="fleet file (YAML), as `tierflow apply -f` takes it")],
    nodes: Annotated[int | None, typer.Option(min=1, help="rescale the fleet's deployments to N nodes in all (same shares)")] = None,
    hours: Annotated[float | None, typer.Option(min=0.0001, help="simulate H hours of arrivals (replaces the spec's duration_s)")] = None,
    duration: Annotated[float | None, typer.Option(min=0.001, help="simulate S seconds of arrivals (replaces the spec's duration_s)")] = None,
    policy: Annotated[str | None, typer.Option(help=f"placement policy: {', '.join(POLICY_NAMES)} (default: the router config's, else hotness)")] = None,
    autoscale: Annotated[bool, typer.Option("--autoscale/--no-autoscale", help="run the autoscaler (default) or keep the fleet as it starts")] = True,
    heartbeat_s: Annotated[float, typer.Option(min=0.001, help="every node's heartbeat interval, seconds")] = 1.0,
    hop_s: Annotated[float | None, typer.Option(min=0.0, help="one network hop with its handling, seconds (default: tierflow.sim.HOP_S, 3 ms)")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="seed of the workload and the router's choices (default: the spec's)")] = None,
    rate_scale: Annotated[float | None, typer.Option(min=0.001, help="multiply every arrival rate by X (a trace: X times its rows, each keeping its tokens)")] = None,
    router_config: Annotated[Path | None, typer.Option(help="the router's configuration (tenants, placement), as `tierflow router --config`")] = None,
    admission: Annotated[bool, typer.Option("--admission/--no-admission", help="run the router's admission (per-model limits shared by class and tenant, as live) or admit everything (default, as --queue-budget 0)")] = False,
    workers: Annotated[int, typer.Option(min=1, help="worker processes; independent deployment groups run side by side")] = 1,
    out: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("report.json"),
    plots: Annotated[Path | None, typer.Option(help="directory for PNG plots of the report (none when left out)")] = None,
    trace: TraceOption = None,
    trace_format: FormatOption = None,
    window: WindowOption = None,
    speed: SpeedOption = None,
) -> None:
    """Simulate SPEC (or a trace replayed with SPEC's mapping) on the fleet in virtual time;
    write a JSON report (and plots) and print a summary.

    Exits 2 when the spec, the trace, the fleet or the options are unusable, 1 when no request succeeded.
    """
    from rich.console import Console

    from tierflow.cli.replay_cli import plan_trace_replay, trace_notes, trace_table
    from tierflow.placement.admission import AdmissionConfig
    from tierflow.services.model_registry.fleet import FleetError
    from tierflow.sim import SimConfig, SimError
    from tierflow.workload.arrivals import run_length
    from tierflow.workload.report import write_report
    from tierflow.workload.spec import SpecError, load_spec

    if hours is not None and duration is not None:
        raise _fail("give --hours or --duration, not both")
    if policy is not None and policy not in POLICY_NAMES:
        raise _fail(f"unknown --policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}")
    cap = hours * 3600.0 if hours is not None else duration
    console = Console(stderr=True)
    try:
        workload = load_spec(spec)
        replay = plan_trace_replay(
            spec, workload, trace=trace, fmt=trace_format, window=window, speed=speed, rate_scale=rate_scale, seed=seed, duration=cap
        )  # fmt: skip
        records = read_fleet(fleet)
        config = SimConfig(
            nodes=nodes, duration_s=cap, rate_scale=rate_scale if rate_scale is not None and replay is None else 1.0,
            policy=policy, router_config=read_router_config(router_config), autoscale=autoscale,
            heartbeat_s=heartbeat_s, seed=seed, **({"hop_s": hop_s} if hop_s is not None else {}),
            admission=AdmissionConfig() if admission else None,
        )  # fmt: skip
    except (SpecError, FleetError, SimError, ValueError) as exc:
        raise _fail(f"{exc}") from None
    if replay is not None:
        planned_s = replay.duration_s
        console.print(trace_table(replay.summary))  # what will be sent, before it is
    else:
        planned_s = run_length(workload.arrivals, duration_s=cap if cap is not None else workload.duration_s)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    began = time.perf_counter()
    try:
        result = _run_with_progress(workload, records, config, workers, planned_s, console, replay.plans if replay is not None else None)
    except SimError as exc:
        raise _fail(f"{exc}") from None
    wall_s = time.perf_counter() - began
    notes: dict[str, str | float | int] = {"spec_file": str(spec), "fleet_file": str(fleet), "workers": workers}
    if replay is not None:
        notes |= trace_notes(replay.summary)
    report = sim_report(
        workload, result, config, wall_s=wall_s, started_at=started_at, notes=notes,
        duration_s=planned_s, trace=replay.summary if replay is not None else None,
    )  # fmt: skip
    written = [write_report(report, out)]
    if plots is not None:
        from tierflow.workload.plots import write_plots

        written += write_plots(report, plots)
    if report.trace is not None:
        Console().print(trace_table(report.trace))
    Console().print(summary_table(report, result))
    for path in written:
        typer.echo(f"wrote {path}")
    if report.totals.ok == 0:
        typer.echo("error: no request succeeded", err=True)
        raise typer.Exit(1)


def sim_report(
    spec: WorkloadSpec,
    result: SimResult,
    config: SimConfig,
    *,
    wall_s: float,
    started_at: str,
    notes: dict[str, str | float | int] | None = None,
    duration_s: float | None = None,
    trace: TraceSummary | None = None,
) -> Report:
    """The report of a simulation, in the format `tierflow loadtest run` writes: rates over
    the time arrivals were offered (`duration_s`, by default the spec's arrivals as the live
    driver takes them), the fleet's samples in the timeline, the run's own figures in
    `meta.notes`, and a trace replay's summary when there was one."""
    from tierflow.rdu.energy import JOULES_PER_KWH
    from tierflow.workload.arrivals import run_length
    from tierflow.workload.report import ReportMeta, build_report

    stats = result.stats
    policy = config.policy or str((config.router_config.get("placement") or {}).get("policy", "hotness"))
    cap = config.duration_s if config.duration_s is not None else spec.duration_s
    everything: dict[str, str | float | int] = {
        "seed": spec.seed if config.seed is None else config.seed, "rate_scale": config.rate_scale,
        "autoscale": int(config.autoscale), "heartbeat_s": config.heartbeat_s, "hop_s": config.hop_s,
        "virtual_s": round(stats.virtual_s, 3), "speed": round(stats.virtual_s / wall_s, 2) if wall_s > 0 else 0.0,
        "sessions": stats.sessions, "utilisation": round(stats.utilisation, 4), "nodes_initial": stats.nodes_initial,
        "nodes_peak": stats.nodes_peak, "nodes_final": stats.nodes_final, "nodes_started": stats.nodes_started,
        "nodes_stopped": stats.nodes_stopped, "heartbeats": stats.heartbeats, "events": stats.events,
        "energy_kwh": round(stats.energy_j / JOULES_PER_KWH, 6),
        **({"tokens_per_kwh": round(stats.tokens_per_kwh)} if stats.tokens_per_kwh is not None else {}), **(notes or {}),
    }  # fmt: skip
    offered = duration_s if duration_s is not None else run_length(spec.arrivals, duration_s=cap)
    meta = ReportMeta(spec=spec.name, source="sim", policy=policy, duration_s=offered, wall_s=wall_s, started_at=started_at, notes=everything)
    return build_report(result.records, slo=spec.slo, meta=meta, fleet_timeline=result.fleet_samples(), trace=trace)


def _fail(message: str) -> typer.Exit:
    """Say what is wrong; the caller raises the exit (status 2: unusable input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _run_with_progress(
    spec: WorkloadSpec, fleet: FleetRecords, config: SimConfig, workers: int, planned_s: float, console: Any, plans: list[SessionPlan] | None
) -> SimResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        parts = f" in {workers} worker processes" if workers > 1 else ""
        task = bar.add_task(f"simulating{parts}", total=planned_s if workers == 1 else None, status="")

        def show(t: float) -> None:
            bar.update(task, completed=min(t, planned_s), status=f"virtual {t:,.0f} s")

        result = run_simulation(spec, fleet, config, workers=workers, progress=show, plans=plans)
        bar.update(task, completed=planned_s, total=planned_s, status=f"virtual {result.stats.virtual_s:,.0f} s")
    return result


def _fleet_energy(stats: SimStats) -> str:
    """The fleet's energy line: every node while up (loads and idle included), per kWh."""
    from tierflow.rdu.energy import JOULES_PER_KWH

    if stats.tokens_per_kwh is None:
        return "energy: no node has a power figure"
    return f"fleet energy {stats.energy_j / JOULES_PER_KWH:,.3f} kWh, {stats.tokens_per_kwh:,.0f} output tokens/kWh"


def summary_table(report: Report, result: SimResult) -> Table:
    """Per model and in total, with the fleet's figures in the caption."""
    from tierflow.cli.report_table import report_table

    meta, stats = report.meta, result.stats
    return report_table(
        report,
        title=(
            f"{meta.spec}: simulated, policy {meta.policy}, {stats.virtual_s:,.0f} s virtual in {meta.wall_s:,.1f} s wall "
            f"({stats.virtual_s / meta.wall_s if meta.wall_s > 0 else 0:,.1f}x)"
        ),
        caption=(
            f"nodes {stats.nodes_initial} at start, {stats.nodes_peak} at peak, {stats.nodes_final} at the end "
            f"({stats.nodes_started} started, {stats.nodes_stopped} stopped); chip utilisation {stats.utilisation:.1%}; "
            f"{_fleet_energy(stats)}. "
            "Latencies in ms; cache hits: prompt tokens found in the prefix cache; cold: model not in HBM"
        ),
    )
