"""`tierflow usage`: what each tenant used, from the usage ledger, summed by tenant, model and period.

    tierflow usage                                    the last 7 days, by tenant and model
    tierflow usage --since 30d --by tenant,day        per tenant per UTC day
    tierflow usage --since 2026-12-01 --until 2027-01-01 --tenant acme --json

Reads `subjects.USAGE_STREAM` (`runtime.usage_stream.read_usage`: an ordered consumer,
nothing durable left on the server) and sums it (`UsageSummary`): requests, prompt /
cached / completion / total tokens, energy, errors and cancellations per group. A request
is counted in the period it was admitted in, as its quota counted it. `--json` prints one
document: the range, the grouping, the rows and the total. Exit codes: 0 done, 2 NATS
unreachable or no usage stream yet (a router makes it at start).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from tierflow.cli.audit import parse_since
from tierflow.runtime.usage_stream import GROUPS, UsageRow, UsageSummary

__all__ = ["usage"]

NatsUrl = Annotated[str, typer.Option(envvar="TIERFLOW_NATS_URL", help="NATS server of the fabric")]


def _instant(text: str, now: datetime, flag: str) -> datetime | None:
    try:
        return parse_since(text, now)
    except typer.BadParameter as exc:
        raise typer.BadParameter(str(exc.message), param_hint=flag) from None


async def _read(nats_url: str, since: datetime | None, until: datetime | None, tenant: str, summary: UsageSummary) -> None:
    from tierflow.cli.nats_connect import connect_once
    from tierflow.runtime.usage_stream import UsageStreamMissing, read_usage

    nc = await connect_once(nats_url, name="tierflow-usage")
    try:
        async for rec in read_usage(nc.jetstream(), since=since.timestamp() if since else None, until=until.timestamp() if until else None, tenant=tenant):
            summary.add(rec)
    except UsageStreamMissing as exc:
        raise ConnectionError(f"NATS at {nats_url} has {exc}") from None
    finally:
        await nc.close()


def _cells(row: UsageRow) -> list[str]:
    return [f"{row.requests:,}", f"{row.prompt_tokens:,}", f"{row.cached_tokens:,}", f"{row.completion_tokens:,}", f"{row.total_tokens:,}",
            f"{row.energy_j / 1000:,.2f}", f"{row.errors:,}", f"{row.cancelled:,}"]  # fmt: skip


def usage(
    since: Annotated[str, typer.Option(help="From when (by admission): 90s, 30m, 1h, 7d, 2w, an ISO 8601 instant, or `all`.")] = "7d",
    until: Annotated[str, typer.Option(help="Until when (excluded): a duration before now, an ISO 8601 instant, or `now`.")] = "now",
    by: Annotated[str, typer.Option(help=f"Group by, comma separated: {', '.join(GROUPS)} (days and hours in UTC).")] = "tenant,model",
    tenant: Annotated[str, typer.Option(help="Only this tenant.")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document: range, grouping, rows, total.")] = False,
    nats_url: NatsUrl = "nats://127.0.0.1:4222",
) -> None:
    """What each tenant used: requests and tokens from the usage ledger, by tenant, model and period."""
    groups = [g.strip() for g in by.split(",") if g.strip()]
    now = datetime.now(UTC)
    start = _instant(since, now, "--since")
    end = None if until.strip() in ("", "now") else _instant(until, now, "--until")
    try:
        summary = UsageSummary(groups)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--by") from None
    try:
        asyncio.run(_read(nats_url, start, end, tenant, summary))
    except ConnectionError as exc:
        typer.echo(f"tierflow usage: {exc}", err=True)
        raise typer.Exit(2) from None
    rows = summary.rows()
    if json_out:
        doc = {"since": start.isoformat() if start else None, "until": (end or now).isoformat(), "by": groups, "tenant": tenant or None,
               "rows": rows, "total": summary.total}  # fmt: skip
        print(msgspec.json.encode(doc).decode(), flush=True)
        return
    span = f"{start.strftime('%Y-%m-%d %H:%M') if start else 'the beginning'} to {(end or now).strftime('%Y-%m-%d %H:%M')} UTC"
    console = Console(soft_wrap=True, highlight=False)
    if not rows:
        console.print(f"no usage from {span}" + (f" for tenant {tenant}" if tenant else ""))
        return
    table = Table(title=f"usage from {span}" + (f", tenant {tenant}" if tenant else ""))
    for group in groups:
        table.add_column(group)
    for column in ("requests", "prompt", "cached", "completion", "total tokens", "energy kJ", "errors", "cancelled"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(row.key[g] for g in groups), *_cells(row))
    table.add_section()
    table.add_row("total", *([""] * (len(groups) - 1)), *_cells(summary.total))
    console.print(table)
