"""`tierflow emulator`: inspect the RDU emulator from the command line."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES
from tierflow.rdu.calibrate import (
    FIT_TOLERANCE,
    FITTED_FIELDS,
    TOLERANCE,
    CalibrationRow,
    calibration_rows,
)
from tierflow.rdu.energy import POWER, request_energy

__all__ = ["app"]

app = typer.Typer(
    help="The RDU emulator: calibration against published figures.", no_args_is_help=True
)

ENERGY_MODELS = ("llama-3.1-8b", "llama-3.1-70b", "gpt-oss-120b")
ENERGY_PROFILES = ("sn40l-16", "h100-8x")
ENERGY_BATCHES = (1, 32)


@app.callback()
def _main() -> None:
    """Keeps `calibrate` a named subcommand even while it is the only one."""


def _mark(r: CalibrationRow) -> str:
    if not r.gated:
        return "[dim]ref[/dim]"
    return "[green]ok[/green]" if r.within_tolerance else "[red]OFF[/red]"


def _energy_table() -> Table:
    table = Table(title="Energy per request, 1,024 tokens in / 1,024 out")
    for col in ("profile", "model", "batch", "J/request", "output tok/kWh", "node power"):
        table.add_column(col, justify="right" if col not in ("profile", "model") else "left")
    for pname in ENERGY_PROFILES:
        power = POWER[pname]
        for model in ENERGY_MODELS:
            for batch in ENERGY_BATCHES:
                e = request_energy(
                    BUILTIN_MODELS[model], BUILTIN_PROFILES[pname], power, batch=batch
                )
                if e is None:
                    table.add_row(pname, model, str(batch), "does not fit", "", "")
                    continue
                table.add_row(
                    pname,
                    model,
                    str(batch),
                    f"{e.joules_per_request:,.0f}",
                    f"{e.tokens_per_kwh:,.0f}",
                    f"{power.node_active_w / 1e3:g} kW ({power.kind})",
                )
    return table


@app.command()
def calibrate(
    json_out: bool = typer.Option(
        False, "--json", help="Print the figures as a JSON list (figure, published, emulated,"
        " error, in_fit, loo_error, ...)."
    ),
) -> None:
    """Every published figure next to the emulator's value, fitted or predicted, with its
    leave-one-out error; energy per request. Exit 1 if a gated figure is off (fitted
    figures beyond ±10%, any error or leave-one-out error beyond ±15%)."""
    rows = calibration_rows()
    bad = [r.figure for r in rows if not r.within_tolerance]
    if json_out:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=2))
        if bad:
            raise typer.Exit(code=1)
        return
    table = Table(
        title=f"RDU emulator vs published figures (fitted ±{FIT_TOLERANCE:.0%},"
        f" predicted and leave-one-out ±{TOLERANCE:.0%})"
    )
    for col in ("figure", "published", "emulated", "error", "role", "LOO error", ""):
        table.add_column(col, justify="left" if col in ("figure", "role") else "right")
    for r in rows:
        emulated = f"{r.emulated:,.4g} {r.unit}"
        if r.detail:
            emulated += f"\n[dim]{r.detail}[/dim]"
        table.add_row(
            r.figure,
            f"{r.published} {r.unit}",
            emulated,
            f"{r.error:+.1%}",
            "fit" if r.in_fit else "predicted",
            f"{r.loo_error:+.1%}",
            _mark(r),
        )
    console = Console()
    console.print(table)
    fitted = sum(r.in_fit for r in rows)
    console.print(
        f"{len(FITTED_FIELDS)} free parameters ({', '.join(FITTED_FIELDS)}), shared by every"
        f" model and both SN40L socket counts, fit {fitted} figures; the other"
        f" {len(rows) - fitted} are predictions (switching uses no fitted parameter)."
        " 'ref' figures are shown, not gated (see tierflow.rdu.figures)."
    )
    console.print("Sources:")
    for r in rows:
        console.print(f"  [dim]{r.figure}: {r.source}[/dim]")
    console.print(_energy_table())
    for pname in ENERGY_PROFILES:
        console.print(f"[dim]{pname} power: {POWER[pname].source}[/dim]")
    if bad:
        console.print(f"[red]{len(bad)} figure(s) off:[/red] {', '.join(bad)}")
        raise typer.Exit(code=1)
