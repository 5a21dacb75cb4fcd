"""`tierflow emulator`: inspect the RDU emulator from the command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from tierflow.rdu.calibrate import TOLERANCE, calibration_rows

__all__ = ["app"]

app = typer.Typer(
    help="The RDU emulator: calibration against published figures.", no_args_is_help=True
)


@app.callback()
def _main() -> None:
    """Keeps `calibrate` a named subcommand even while it is the only one."""


@app.command()
def calibrate() -> None:
    """Print every published figure next to the emulator's value; exit 1 if any is off by >15%."""
    rows = calibration_rows()
    table = Table(title=f"RDU emulator vs published figures, sn40l-16 (tolerance ±{TOLERANCE:.0%})")
    table.add_column("figure")
    table.add_column("published", justify="right")
    table.add_column("emulated", justify="right")
    table.add_column("error", justify="right")
    table.add_column("role")
    table.add_column("", justify="center")
    for r in rows:
        ok = "[green]ok[/green]" if r.within_tolerance else "[red]OFF[/red]"
        emulated = f"{r.emulated:,.1f} {r.unit}"
        if r.detail:
            emulated += f"\n[dim]{r.detail}[/dim]"
        table.add_row(
            r.figure,
            f"{r.published} {r.unit}",
            emulated,
            f"{r.relative_error:+.1%}",
            "fit" if r.fitted else "predicted",
            ok,
        )
    console = Console()
    console.print(table)
    console.print(
        "4 shared parameters (HBM efficiency, per-layer overhead, MoE dispatch, spec-decode"
        " acceptance) fit 5 decode figures; the switching speed-up is predicted from link rates."
    )
    bad = [r.figure for r in rows if not r.within_tolerance]
    if bad:
        console.print(f"[red]{len(bad)} figure(s) outside ±{TOLERANCE:.0%}:[/red] {', '.join(bad)}")
        raise typer.Exit(code=1)
