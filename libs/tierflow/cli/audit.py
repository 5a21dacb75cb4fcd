"""`tierflow audit`: read the audit stream (who changed the registry, cordoned or drained a
node, started or stopped nodes), oldest first.

    tierflow audit                        the last hour, as a table
    tierflow audit --since 7d --kind registry --json      JSON lines, one record each
    tierflow audit --follow               then keep printing new records until Ctrl-C

Reads `subjects.AUDIT_STREAM` through an ordered consumer (`runtime.audit.read_records`:
nothing durable is left on the server); without `--follow` it stops once caught up. Exit codes:
0 done, 2 NATS unreachable or no audit stream yet (the model registry makes it at start).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from tierflow.contracts import audit as contract

__all__ = ["audit", "parse_since"]

NatsUrl = Annotated[str, typer.Option(envvar="TIERFLOW_NATS_URL", help="NATS server of the fabric")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_since(text: str, now: datetime) -> datetime | None:
    """`1h`, `30m`, `7d`, `90s`, `2w` before `now`, an ISO 8601 instant, or `all` (None)."""
    text = text.strip()
    if text in ("", "all", "0"):
        return None
    found = _DURATION.match(text)
    if found:
        return now - timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a duration (90s, 30m, 1h, 7d, 2w), an ISO 8601 instant or `all`", param_hint="--since") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _row(rec: contract.AuditRecord) -> list[str]:
    at = datetime.fromtimestamp(rec.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    detail = ", ".join(f"{k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}" for k, v in rec.detail.items())
    return [at, rec.kind, rec.identity, rec.action, rec.target, "ok" if rec.ok else "[red]refused/failed[/red]", detail]


async def _read(nats_url: str, kind: str, since: datetime | None, follow: bool, emit: Callable[[contract.AuditRecord], None]) -> int:
    """Hand every record (oldest first) to `emit`; how many there were."""
    from tierflow.cli.nats_connect import connect_once
    from tierflow.runtime.audit import AuditStreamMissing, read_records

    nc = await connect_once(nats_url, name="tierflow-audit")
    count = 0
    try:
        async for rec in read_records(nc.jetstream(), kind=kind, since=since, follow=follow):
            emit(rec)
            count += 1
    except AuditStreamMissing as exc:
        raise ConnectionError(f"NATS at {nats_url} has {exc}") from None
    finally:
        await nc.close()
    return count


def audit(
    since: Annotated[str, typer.Option(help="How far back: 90s, 30m, 1h, 7d, 2w, an ISO 8601 instant, or `all`.")] = "1h",
    kind: Annotated[str, typer.Option(help=f"Only this kind: {', '.join(contract.KINDS)}.")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines, one record each.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records until Ctrl-C.")] = False,
    nats_url: NatsUrl = "nats://127.0.0.1:4222",
) -> None:
    """Who changed what: registry admin calls, node cordons and drains, nodes started and stopped."""
    if kind and kind not in contract.KINDS:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(contract.KINDS)}", param_hint="--kind")
    start = parse_since(since, datetime.now(UTC))
    console = Console(soft_wrap=True, highlight=False)
    table = Table(title=f"audit since {start.strftime('%Y-%m-%d %H:%M:%S UTC') if start else 'the beginning'}")
    for column in ("at (UTC)", "kind", "identity", "action", "target", "outcome", "detail"):
        table.add_column(column, overflow="fold")

    def emit(rec: contract.AuditRecord) -> None:
        if json_out:
            print(msgspec.json.encode(rec).decode(), flush=True)
        elif follow:
            console.print(" ".join(_row(rec)))
        else:
            table.add_row(*_row(rec))

    try:
        count = asyncio.run(_read(nats_url, kind, start, follow, emit))
    except KeyboardInterrupt:
        return
    except ConnectionError as exc:
        typer.echo(f"tierflow audit: {exc}", err=True)
        raise typer.Exit(2) from None
    if not json_out and not follow:
        console.print(table if count else "no audit records in that window")
