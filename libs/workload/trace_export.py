"""The fabric's own traffic as a trace: the router's `request` log records, written in tierflow's trace format.

The router leaves one JSON log line per request (`services/router/dispatch.py`,
`RequestRecord.emit`; under `tierflow up` in `.tierflow/logs/router.log`). A replay
needs, per request: when it arrived (the line's `ts` is when it ended, so arrival is
`ts - e2e_latency`), its prompt length, its output length (what came out when it
succeeded, else the `max_tokens` it asked for), the ids of its prompt's 512-token
blocks (`hash_ids`: the router's chained block hashes at every 512 tokens, so equal ids
mean an equal prefix, as in Mooncake's traces), its model, tenant and session.

    {"timestamp": 0.0, "input_length": 1207, "output_length": 64, "hash_ids": [8817..., 5120...], "model": "llama-3.1-8b", "session_id": "acme:s000001", "tenant": "acme"}

`timestamp` is milliseconds since the first request's arrival. Records the router never
placed (rejected before it knew the model: bad key, unknown model, over a rate limit)
hold no prompt to replay and are skipped, as are those with nothing to ask for; the
export counts every skip by reason. Lines that are not request records (the router's
other logs) are passed over.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from tierflow.workload.traces import TraceRow

__all__ = ["Export", "export_router_log", "write_trace"]


class Export(msgspec.Struct, frozen=True, kw_only=True):
    """The trace rows (by arrival) and the request records skipped, by reason."""

    rows: list[TraceRow]
    skipped: dict[str, int]
    unreadable_lines: int  # lines that are not JSON (a line cut off by a crash, a stray print)


class _Record(msgspec.Struct):
    """The fields of a router `request` record a trace needs (records before hash_ids and
    max_tokens were logged read with their defaults)."""

    ts: float
    e2e_latency: float = 0.0
    model: str = ""
    tenant: str = ""
    session: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int = 0
    outcome: str = ""
    hash_ids: list[int] = []


_DECODE_ANY = msgspec.json.Decoder(dict[str, Any]).decode


def export_router_log(lines: Iterable[bytes]) -> Export:
    """The trace of the request records among `lines` (a router log's lines)."""
    arrivals: list[tuple[float, _Record]] = []
    skipped: dict[str, int] = {}
    unreadable = 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            fields = _DECODE_ANY(raw)
        except msgspec.DecodeError:
            unreadable += 1
            continue
        if fields.get("msg") != "request" or fields.get("logger") != "tierflow.request":
            continue
        try:
            record = msgspec.convert(fields, _Record)
        except msgspec.ValidationError:
            unreadable += 1
            continue
        output = record.completion_tokens if record.outcome == "ok" else record.max_tokens
        reason = "not placed (no model or prompt)" if not record.model or record.prompt_tokens <= 0 else "no output tokens" if output <= 0 else ""
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        arrivals.append((record.ts - record.e2e_latency, msgspec.structs.replace(record, completion_tokens=output)))
    arrivals.sort(key=lambda pair: pair[0])
    first = arrivals[0][0] if arrivals else 0.0
    rows = [
        TraceRow(
            timestamp=round((at - first) * 1000.0, 3), input_length=r.prompt_tokens, output_length=r.completion_tokens,
            hash_ids=r.hash_ids, model=r.model, session_id=r.session, tenant=r.tenant,
        )  # fmt: skip
        for at, r in arrivals
    ]
    return Export(rows=rows, skipped=dict(sorted(skipped.items())), unreadable_lines=unreadable)


def write_trace(rows: Iterable[TraceRow], path: str | Path) -> Path:
    """JSON lines, one row each: the format `tierflow.workload.traces` reads as `tierflow`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    encode = msgspec.json.Encoder().encode
    with target.open("wb") as out:
        for row in rows:
            out.write(encode(row) + b"\n")
    return target
