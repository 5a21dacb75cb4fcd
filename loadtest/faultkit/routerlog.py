"""The routers' own account: their per-request `request` records, read from DATA/logs.

Every router writes one JSON line per request it answered (`services/router/dispatch.py`,
`RequestRecord.emit`): outcome, status, error, the nodes tried (`attempts`) and the
streams resumed elsewhere (`migrations`). The suite joins them to its client records by
`request_id` (the `x-request-id` a response carries) to tell a call that went through
untouched from one the fabric retried or migrated invisibly. A router killed with -9
leaves no record for what it had in flight: those calls only have the client's side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

__all__ = ["RouterRecord", "log_lines", "read_router_records", "watch_resumed"]


class RouterRecord(msgspec.Struct, kw_only=True):
    """The fields of a router `request` record the suite reads (the rest are skipped)."""

    ts: float
    service: str = ""
    request_id: str = ""
    model: str = ""
    model_version: str = ""
    node: str = ""
    prefill_node: str = ""
    nodes_tried: list[str] = []
    attempts: int = 0
    migrations: int = 0
    outcome: str = ""
    status: int = 0
    error: str = ""
    completion_tokens: int = 0
    max_tokens: int = 0


class _Line(msgspec.Struct):
    msg: str = ""


_line = msgspec.json.Decoder(_Line)
_record = msgspec.json.Decoder(RouterRecord)


def read_router_records(logs: Path, *, router_glob: str = "router*.log") -> dict[str, RouterRecord]:
    """request_id -> its record, over every router log under `logs` (the last one wins:
    request ids are unique, so there is one unless a log was appended to twice)."""
    out: dict[str, RouterRecord] = {}
    for path in sorted(logs.glob(router_glob)):
        with open(path, "rb") as file:
            for raw in file:
                if b'"request"' not in raw:  # cheap pre-filter; the decode below decides
                    continue
                try:
                    if _line.decode(raw).msg != "request":
                        continue
                    record = _record.decode(raw)
                except msgspec.DecodeError:
                    continue  # a line cut short by a SIGKILL
                record.service = path.stem
                out[record.request_id] = record
    return out


def log_lines(path: Path, needle: str) -> list[dict[str, Any]]:
    """Every JSON line of `path` whose text contains `needle`, decoded (bad lines skipped)."""
    found: list[dict[str, Any]] = []
    if not path.exists():
        return found
    with open(path, "rb") as file:
        for raw in file:
            if needle.encode() in raw:
                try:
                    found.append(msgspec.json.decode(raw))
                except msgspec.DecodeError:
                    continue
    return found


def watch_resumed(logs: Path, since: float, resumed: float, *, bucket: str = "tierflow-registry") -> dict[str, float | str]:
    """Per router log: seconds from `resumed` (NATS back) to its first "watch of BUCKET
    ... resumed" line after `since` (negative: before NATS was back), or "not down"."""
    out: dict[str, float | str] = {}
    for path in sorted(logs.glob("router*.log")):
        lines = [line for line in log_lines(path, f"watch of {bucket}/") if line.get("ts", 0) > since and " resumed " in str(line.get("msg", ""))]
        out[path.stem] = round(lines[0]["ts"] - resumed, 2) if lines else "not down"
    return out
