"""Production traces, read whole: Mooncake, Azure LLM inference, BurstGPT and tierflow's own.

    mooncake  JSON lines  {"timestamp": ms, "input_length", "output_length", "hash_ids": [512-token block ids]}
    tierflow  JSON lines  Mooncake's fields, plus "model", "session_id", "tenant" (what
                          `tierflow loadtest export-trace` writes from the router's log)
    azure     CSV         TIMESTAMP (a date and time), ContextTokens, GeneratedTokens
    burstgpt  CSV         Timestamp (seconds), Model, Request tokens, Response tokens, Total tokens, Log Type

`load_trace(path)` detects the format from the file's first line (`format=` forces
one) and reads every row before anything is replayed: a malformed row is a
`TraceError` naming the file, the line and the field or column, and no row of a file
with one is ever sent. Up to `MAX_PROBLEMS` problems are listed, then how many more.

A `Trace` holds what the file says, in columns, sorted by arrival (stable, so equal
times keep the file's order): times in seconds since the first row, token counts, each
row's line number (replayed requests are named after it), its prefix block ids, and the
model, session and tenant columns of the formats that have them. What a replay does
with rows it cannot send as written (no output tokens, prompts shorter than a chat
template) is `replay`'s business, counted in its report.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Final

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from tierflow.workload.spec import TRACE_FORMATS, TraceFormat
from tierflow.workload.trace_text import TRACE_BLOCK_TOKENS

__all__ = ["MAX_PROBLEMS", "Trace", "TraceRow", "TraceError", "detect_format", "parse_trace", "load_trace"]

MAX_PROBLEMS: Final = 20
_NO_IDS: tuple[int, ...] = ()


class TraceError(ValueError):
    """A trace that cannot be replayed; `problems` lists each one as `FILE:LINE: field: what is wrong`."""

    def __init__(self, problems: list[str], *, more: int = 0) -> None:
        tail = [f"... and {more} more malformed rows"] if more else []
        super().__init__("invalid trace:\n" + "\n".join(f"  - {p}" for p in [*problems, *tail]))
        self.problems = problems
        self.more = more


class Trace(msgspec.Struct, frozen=True, kw_only=True):
    """Every row of one trace file, as columns sorted by arrival (see the module docstring).

    `time_s`: seconds since the earliest row; `origin`: that row's timestamp as the file
    writes it; `hash_ids`: per row, the ids of its leading 512-token blocks (empty for
    formats without them); `model`, `session`, `tenant`: None when the format has no
    such column, else one string per row ("" where a row leaves it empty).
    """

    source: str
    format: TraceFormat
    origin: str
    time_s: npt.NDArray[np.float64]
    input_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    line: npt.NDArray[np.int64]
    hash_ids: list[tuple[int, ...]]
    model: list[str] | None = None
    session: list[str] | None = None
    tenant: list[str] | None = None

    @property
    def rows(self) -> int:
        return int(self.time_s.size)

    @property
    def span_s(self) -> float:
        """From the first row's arrival to the last's."""
        return float(self.time_s[-1]) if self.time_s.size else 0.0


class _Rows:
    """Rows as they are read (file order), and the problems found on the way."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.time: list[float] = []
        self.input: list[int] = []
        self.output: list[int] = []
        self.line: list[int] = []
        self.hash_ids: list[tuple[int, ...]] = []
        self.model: list[str] = []
        self.session: list[str] = []
        self.tenant: list[str] = []
        self.problems: list[str] = []
        self.more = 0
        self.origin = ""  # the earliest row's time as the file writes it
        self._earliest = math.inf

    def add(self, line: int, time: float, time_text: str, tokens_in: int, tokens_out: int, hash_ids: tuple[int, ...]) -> None:
        if time < self._earliest:
            self._earliest, self.origin = time, time_text
        self.time.append(time)
        self.input.append(tokens_in)
        self.output.append(tokens_out)
        self.line.append(line)
        self.hash_ids.append(hash_ids)

    def problem(self, line: int, where: str, what: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{self.source}:{line}: {where}: {what}")
        else:
            self.more += 1

    def trace(self, fmt: TraceFormat, *, model: bool = False, session: bool = False, tenant: bool = False) -> Trace:
        if self.problems:
            raise TraceError(self.problems, more=self.more)
        if not self.time:
            raise TraceError([f"{self.source}: no rows (a trace needs at least one request)"])
        times = np.array(self.time, dtype=np.float64)
        order = np.argsort(times, kind="stable")
        first = float(times[order[0]])

        def pick(values: list[str]) -> list[str]:
            return [values[i] for i in order.tolist()]

        return Trace(
            source=self.source, format=fmt, origin=self.origin, time_s=times[order] - first,
            input_tokens=np.array(self.input, dtype=np.int64)[order], output_tokens=np.array(self.output, dtype=np.int64)[order],
            line=np.array(self.line, dtype=np.int64)[order], hash_ids=[self.hash_ids[i] for i in order.tolist()],
            model=pick(self.model) if model else None, session=pick(self.session) if session else None,
            tenant=pick(self.tenant) if tenant else None,
        )  # fmt: skip


# ------------------------------------------------------------------------------ JSON lines

Count = Annotated[int, Meta(ge=0)]
BlockId = Annotated[int, Meta(ge=0)]  # msgspec decodes ints up to 2**64 - 1, the size of the router's hashes


class TraceRow(msgspec.Struct, omit_defaults=True):
    """One row of Mooncake's format, and of tierflow's, which adds model, session_id and tenant
    (`tierflow loadtest export-trace` writes these)."""

    timestamp: Annotated[float, Meta(ge=0)]  # milliseconds since the trace's start
    input_length: Count
    output_length: Count
    hash_ids: list[BlockId] = []
    model: str = ""
    session_id: str = ""
    tenant: str = ""


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.S)
_DECODE_ROW = msgspec.json.Decoder(TraceRow).decode


def _json_rows(data: bytes, source: str, fmt: TraceFormat) -> Trace:
    rows = _Rows(source)
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = _DECODE_ROW(raw)
        except msgspec.ValidationError as exc:
            m = _AT.match(str(exc))
            assert m is not None  # the pattern matches any string
            rows.problem(number, f"field `{m['path']}`" if m["path"] else "row", m["msg"])
            continue
        except msgspec.DecodeError as exc:
            rows.problem(number, "row", f"not a JSON object ({exc})")
            continue
        blocks = math.ceil(row.input_length / TRACE_BLOCK_TOKENS)
        if len(row.hash_ids) > blocks:
            rows.problem(
                number, "field `hash_ids`",
                f"{len(row.hash_ids)} block ids, but input_length {row.input_length} fills only {blocks} "
                f"block{'s' if blocks != 1 else ''} of {TRACE_BLOCK_TOKENS} tokens (is this trace's block size {TRACE_BLOCK_TOKENS}?)",
            )  # fmt: skip
            continue
        hash_ids = tuple(row.hash_ids) if row.hash_ids else _NO_IDS
        rows.add(number, row.timestamp / 1000.0, f"{row.timestamp:g} ms", row.input_length, row.output_length, hash_ids)
        rows.model.append(row.model)
        rows.session.append(row.session_id)
        rows.tenant.append(row.tenant)
    own = fmt == "tierflow"
    return rows.trace(fmt, model=own, session=own, tenant=own)


# ------------------------------------------------------------------------------ CSV


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError
    return value


_DATETIME = re.compile(
    r"^\s*(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?\s*(?:(Z)|([+-])(\d\d):?(\d\d))?\s*$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _datetime_seconds(text: str) -> float:
    """Seconds since 1970 of Azure's `2023-11-16 18:15:46.6805900` (7 fractional digits,
    more than datetime.fromisoformat takes) or `2024-05-10 00:00:00.009930+00:00`; no zone = UTC."""
    m = _DATETIME.match(text)
    if m is None:
        raise ValueError
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    whole = (datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc) - _EPOCH).total_seconds()
    fraction = float(f"0.{m[7]}") if m[7] else 0.0
    offset = 0.0
    if m[9]:
        offset = (int(m[10]) * 3600 + int(m[11]) * 60) * (1 if m[9] == "+" else -1)
    return whole + fraction - offset


_Parse = Callable[[str], object]
_EXPECTED: dict[_Parse, str] = {
    _count: "a whole number of tokens >= 0",
    _seconds: "seconds >= 0",
    _datetime_seconds: "a date and time like 2023-11-16 18:15:46.6805900",
}


class _CsvFormat(msgspec.Struct, frozen=True):
    """The columns of one CSV format, and how its time column reads (seconds, or a date and time)."""

    name: TraceFormat
    time: str
    time_parse: _Parse
    input: str
    output: str
    model: str | None = None


_AZURE = _CsvFormat("azure", "TIMESTAMP", _datetime_seconds, "ContextTokens", "GeneratedTokens")
_BURSTGPT = _CsvFormat("burstgpt", "Timestamp", _seconds, "Request tokens", "Response tokens", model="Model")
_CSV_FORMATS: dict[str, _CsvFormat] = {"azure": _AZURE, "burstgpt": _BURSTGPT}


def _csv_rows(text: str, source: str, spec: _CsvFormat) -> Trace:
    reader = csv.reader(io.StringIO(text))
    rows = _Rows(source)
    header = next(reader, None)
    if header is None:
        raise TraceError([f"{source}: empty file (expected a CSV header with {spec.time}, {spec.input}, {spec.output})"])
    header = [name.strip() for name in header]
    wanted = [c for c in (spec.time, spec.input, spec.output, spec.model) if c is not None]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise TraceError([f"{source}:1: header: no column {', '.join(repr(c) for c in missing)} for the {spec.name} format (columns: {', '.join(header)})"])
    at = {name: header.index(name) for name in wanted}
    columns: list[tuple[str, _Parse]] = [(spec.time, spec.time_parse), (spec.input, _count), (spec.output, _count)]
    for record in reader:
        number = reader.line_num
        if not record or all(not field.strip() for field in record):
            continue
        values: list[object] = []
        for name, parse in columns:
            column = at[name]
            field = record[column].strip() if column < len(record) else None
            try:
                if field is None:
                    raise ValueError
                values.append(parse(field))
            except ValueError:
                got = "nothing (the row is short)" if field is None else repr(field)
                rows.problem(number, f"column {column + 1} `{name}`", f"expected {_EXPECTED[parse]}, got {got}")
                break
        else:
            time, tokens_in, tokens_out = values
            rows.add(number, float(time), record[at[spec.time]].strip(), int(tokens_in), int(tokens_out), _NO_IDS)  # type: ignore[arg-type, call-overload]
            if spec.model is not None:
                column = at[spec.model]
                rows.model.append(record[column].strip() if column < len(record) else "")
    return rows.trace(spec.name, model=spec.model is not None)


# ------------------------------------------------------------------------------ formats


def detect_format(first_line: str, name: str) -> TraceFormat:
    """The format of a file from its first line; ValueError (naming the file as `name`) says why none fits."""
    line = first_line.lstrip("\ufeff").strip()
    if line.startswith("{"):
        try:
            keys = msgspec.json.decode(line, type=dict[str, object])
        except msgspec.DecodeError:
            raise ValueError(f"{name}: the first line looks like JSON but is not a JSON object") from None
        if "input_length" not in keys:
            raise ValueError(f"{name}: JSON lines without `input_length`: not a Mooncake or tierflow trace")
        return "tierflow" if {"model", "session_id", "tenant"} & keys.keys() else "mooncake"
    columns = {c.strip() for c in next(csv.reader([line]), [])}
    for spec in _CSV_FORMATS.values():
        if {spec.time, spec.input, spec.output} <= columns:
            return spec.name
    raise ValueError(
        f"{name}: cannot tell the trace format from its first line {line[:120]!r}; expected JSON lines with "
        f"input_length (mooncake, tierflow) or a CSV header with {_AZURE.time}, {_AZURE.input}, {_AZURE.output} (azure) "
        f"or {_BURSTGPT.time}, {_BURSTGPT.input}, {_BURSTGPT.output} (burstgpt); or give the format (--format)"
    )


def _first_line(data: bytes) -> str:
    lines: Iterator[bytes] = (line for line in data.splitlines() if line.strip())
    return next(lines, b"").decode("utf-8", errors="replace")


def parse_trace(data: bytes, *, source: str = "trace", format: TraceFormat | None = None) -> Trace:
    """The trace in `data` (a whole file's bytes); TraceError lists the malformed rows."""
    if format is not None and format not in TRACE_FORMATS:
        raise TraceError([f"{source}: unknown format {format!r}; choose one of {', '.join(TRACE_FORMATS)}"])
    try:
        fmt = format or detect_format(_first_line(data), source)
    except ValueError as exc:
        raise TraceError([str(exc)]) from None
    if fmt in ("mooncake", "tierflow"):
        return _json_rows(data, source, fmt)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TraceError([f"{source}:{line}: not UTF-8 text ({exc.reason})"]) from None
    return _csv_rows(text, source, _CSV_FORMATS[fmt])


def load_trace(path: str | Path, *, format: TraceFormat | None = None) -> Trace:
    """The trace file at `path`, whole (see `parse_trace`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise TraceError([f"{p}: cannot read: {exc.strerror}"]) from None
    return parse_trace(data, source=str(p), format=format)
