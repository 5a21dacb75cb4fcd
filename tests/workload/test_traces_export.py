"""The router's request log becomes a trace (tierflow's format) that reads back as it was written."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from tierflow.cli.main import app
from tierflow.rdu import block_hashes
from tierflow.runtime.logs import JsonFormatter
from tierflow.services.router.dispatch import RequestRecord, trace_block_ids
from tierflow.workload.trace_export import export_router_log, write_trace
from tierflow.workload.traces import load_trace


def _log_line(record: RequestRecord, ts: float) -> bytes:
    """The line the router writes for `record` when it ends at `ts` (its real formatter)."""
    captured: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = captured.append  # type: ignore[method-assign]
    logger = logging.getLogger("tierflow.request")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not `.level =`: it also clears isEnabledFor's cache
    try:
        record.emit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    captured[0].created = ts
    return JsonFormatter("router").format(captured[0]).encode()


def _record(**fields: object) -> RequestRecord:
    base: dict[str, object] = {"request_id": "x", "api": "chat", "model": "m1", "tenant": "acme", "prompt_tokens": 1100, "max_tokens": 50}
    return RequestRecord(**(base | fields))  # type: ignore[arg-type]


def test_the_router_names_each_512_token_prefix_by_its_chained_hash() -> None:
    ids = list(range(1300))
    hashes = block_hashes(ids, 64)
    named = trace_block_ids(hashes, 64, ids)
    assert named == [hashes[7], hashes[15]]  # placement's hashes, sliced: no second pass over the prompt
    other = ids[:1000] + [7] * 300  # the same first 1000 tokens: the same first 512-token block, not the second
    shared = trace_block_ids(block_hashes(other, 64), 64, other)
    assert shared[0] == named[0] and shared[1] != named[1]
    assert trace_block_ids(block_hashes(ids, 48), 48, ids) == block_hashes(ids, 512)  # a block size that does not divide 512


def test_request_records_become_rows_by_arrival() -> None:
    lines = [
        b'{"ts": 99.0, "level": "info", "service": "router", "logger": "tierflow.router", "msg": "listening"}',
        _log_line(_record(session="acme:s1", completion_tokens=50, hash_ids=[11, 12], e2e=2.0), ts=1002.0),  # arrived at 1000
        _log_line(_record(model="m2", prompt_tokens=40, completion_tokens=3, e2e=0.5, outcome="error"), ts=1000.75),  # 1000.25; asked for 50
        _log_line(_record(model="", prompt_tokens=0, status=401, outcome="error"), ts=1001.0),  # rejected before placement
        _log_line(_record(completion_tokens=0, max_tokens=0, e2e=0.1), ts=1003.0),
        b'{"ts": 1004.0, "logger": "tierflow.request", "msg": "request", "model": "m1", "prompt_tokens": 7, "completion_tokens": 2, "outcome": "ok"}',
        b"Traceback (most recent call last):",
        b"",
    ]
    exported = export_router_log(lines)
    assert exported.skipped == {"no output tokens": 1, "not placed (no model or prompt)": 1} and exported.unreadable_lines == 1
    rows = [msgspec.structs.asdict(row) for row in exported.rows]
    assert rows == [
        {"timestamp": 0.0, "input_length": 1100, "output_length": 50, "hash_ids": [11, 12], "model": "m1", "session_id": "acme:s1", "tenant": "acme"},
        {"timestamp": 250.0, "input_length": 40, "output_length": 50, "hash_ids": [], "model": "m2", "session_id": "", "tenant": "acme"},
        {"timestamp": 4000.0, "input_length": 7, "output_length": 2, "hash_ids": [], "model": "m1", "session_id": "", "tenant": ""},
    ]  # a record from before hash_ids were logged still exports (its text replays as its own)


def test_an_exported_trace_reads_back_as_the_tierflow_format(tmp_path: Path) -> None:
    exported = export_router_log([_log_line(_record(session="s", completion_tokens=9, hash_ids=[2**64 - 1], e2e=1.0), ts=10.0)])
    path = write_trace(exported.rows, tmp_path / "out" / "trace.jsonl")
    assert path.read_bytes() == (
        b'{"timestamp":0.0,"input_length":1100,"output_length":9,"hash_ids":[18446744073709551615],"model":"m1","session_id":"s","tenant":"acme"}\n'
    )
    trace = load_trace(path)
    assert trace.format == "tierflow" and trace.hash_ids == [(2**64 - 1,)] and trace.session == ["s"] and trace.model == ["m1"]


def test_export_trace_command(tmp_path: Path) -> None:
    log = tmp_path / "router.log"
    log.write_bytes(b"\n".join([_log_line(_record(completion_tokens=5, e2e=0.5), ts=t) for t in (5.0, 6.5)]) + b"\n")
    result = CliRunner().invoke(app, ["loadtest", "export-trace", str(log), "-o", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 't.jsonl'}: 2 requests over 1.5 s" in result.output
    assert load_trace(tmp_path / "t.jsonl").time_s.tolist() == pytest.approx([0.0, 1.5])
    empty = tmp_path / "empty.log"
    empty.write_text('{"ts": 1, "logger": "tierflow.router", "msg": "listening"}\n')
    result = CliRunner().invoke(app, ["loadtest", "export-trace", str(empty)])
    assert result.exit_code == 2 and "holds no request record to export" in result.output
