"""`tierflow keys new | hash`: API keys (and admin tokens) as configuration should hold them.

    tierflow keys new --tenant acme      a fresh key (first line, printed once) and its api_keys entry
    tierflow keys new --not-after 2027-01-31T00:00:00Z   ... which stops working then
    echo "$KEY" | tierflow keys hash     the salted hash of a key you have (or an admin
                                         token, for the registry's --admin-token-hash)

Only the salted hash goes into the router's tenants file (`tierflow.placement.api_keys`);
the key itself is shown here once and stored nowhere. Rotation: add the new key's line
beside the old one, give the old one a `not_after`, move clients over, remove it.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer

from tierflow.runtime.secret_hash import new_secret, salted_hash

__all__ = ["app", "KEY_PREFIX"]

KEY_PREFIX = "sk-tf"

app = typer.Typer(help="API keys: make one (printed once) or hash one, for the router's tenants file.", no_args_is_help=True,
                  add_completion=False, rich_markup_mode=None)  # fmt: skip


def _instant(text: str) -> str:
    """`text` as an ISO 8601 instant in UTC (no zone given: UTC), or a clear error."""
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 instant such as 2027-01-31T00:00:00Z", param_hint="--not-after") from None
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry(digest: str, not_after: str) -> str:
    return f'{{key: "{digest}", not_after: {not_after}}}' if not_after else digest


@app.command("new")
def new(
    tenant: Annotated[str, typer.Option(help="The tenant the key is for (a name in the router's tenants file).")] = "",
    not_after: Annotated[str, typer.Option(help="The key stops working after this instant (ISO 8601, e.g. 2027-01-31T00:00:00Z).")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print {key, hash, entry, tenant} as JSON.")] = False,
) -> None:
    """A fresh API key (256 random bits), printed once, with its tenants-file line."""
    until = _instant(not_after) if not_after else ""
    key = new_secret(KEY_PREFIX)
    digest = salted_hash(key)
    entry = _entry(digest, until)
    if json_out:
        print(json.dumps({"key": key, "hash": digest, "entry": entry, "tenant": tenant, "not_after": until or None}))
        return
    # The key alone on the first line, the entry on one line of its own: scripts take them
    # apart with `head -n 1` and a grep for the entry (deploy/init-secrets.sh does).
    print(key)
    print("# The API key above is shown only now and stored nowhere: give it to the client.")
    where = f"tenant {tenant}" if tenant else "a tenant"
    print(f"# Add this entry to the api_keys of {where} in the router's tenants file (--config):")
    print(f"      - {entry}")
    print("# Routers read the file at start: restart them (one at a time) to take the key.")


@app.command("hash")
def hash_keys() -> None:
    """Salted hashes of the keys (or admin tokens) read from stdin, one per line."""
    lines = [line.strip() for line in sys.stdin if line.strip()]
    if not lines:
        typer.echo("no key on stdin: `echo \"$KEY\" | tierflow keys hash`", err=True)
        raise typer.Exit(1)
    for line in lines:
        print(salted_hash(line))
