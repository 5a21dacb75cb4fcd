"""A trace replayed live through `tierflow loadtest run --trace`, and the router's log exported back into the same trace."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tierflow.workload.report import load_report
from tierflow.workload.trace_export import export_router_log

pytestmark = pytest.mark.fabric

# Eight requests over 3.5 s of trace time: rows 1, 3 and 6 share two 512-token blocks,
# rows 2 and 5 one; the rest stand alone (block ids as Mooncake writes them).
ROWS = [
    (0, 1200, 6, [1, 2, 3]),
    (300, 700, 4, [10, 11]),
    (700, 1500, 9, [1, 2, 4]),
    (1100, 300, 5, [20]),
    (1500, 800, 7, [10, 12]),
    (2500, 1100, 8, [1, 2, 5]),
    (3000, 100, 3, [30]),
    (3500, 650, 6, [40, 41]),
]
TRACE = "".join(f'{{"timestamp": {t}, "input_length": {i}, "output_length": {o}, "hash_ids": {ids}}}\n' for t, i, o, ids in ROWS)
SPEC = """\
name: live-trace
trace:
  mix: [{model: llama-3.1-8b, weight: 1}, {model: gpt-oss-20b, weight: 1}]
  speed: 2
"""


def test_a_trace_replays_live_with_its_exact_tokens_and_exports_back(fabric, tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "trace.jsonl").write_text(TRACE)
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "tierflow", "loadtest", "run", str(tmp_path / "spec.yaml"), "--trace", str(tmp_path / "trace.jsonl"),
         "--url", fabric.base_url, "--out", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "prefix reuse" in out.stdout and "measured" in out.stdout  # the trace table, with what the run measured

    report = load_report(tmp_path / "report.json")
    assert report.trace is not None and report.meta.duration_s == 1.75  # 3.5 trace seconds at speed 2
    assert (report.totals.requests, report.totals.ok) == (8, 8)
    measured, source = report.trace.measured, report.trace.source
    assert measured is not None
    # Exact tokens: the fabric counted every prompt as the trace wrote it and gave exactly the output asked for.
    assert report.totals.input_tokens_per_s * 1.75 == pytest.approx(sum(r[1] for r in ROWS))
    assert report.totals.output_tokens_per_s * 1.75 == pytest.approx(sum(r[2] for r in ROWS))
    assert (measured.input_tokens, measured.output_tokens) == (source.input_tokens, source.output_tokens)
    # The trace's arrivals at twice the speed: 0, 0.15, 0.35, 0.55, 0.75 | 1.25, 1.5, 1.75 s: 5 in the first second, 3 in the next.
    assert [w.requests for w in report.timeline] == [5, 3]

    def ours() -> list[bytes]:
        lines = [line.encode() for line in fabric.log("router").splitlines() if '"msg":"request"' in line]
        return [line for line in lines if float(line.split(b'"ts":', 1)[1].split(b",", 1)[0]) >= before]

    deadline = time.monotonic() + 5  # the router writes its records once per loop turn: the last may lag its response
    while len(ours()) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    exported = export_router_log(ours())
    assert len(exported.rows) == 8 and not exported.skipped
    rows = exported.rows
    assert [(r.input_length, r.output_length) for r in rows] == [(i, o) for _, i, o, _ in ROWS]
    # Arrivals as the router saw them: the trace's, at speed 2, up to client start-up (the first
    # request also opens the connection) and scheduling jitter.
    offsets = [r.timestamp - t / 2 for r, (t, *_) in zip(rows, ROWS)]
    assert max(offsets[1:]) - min(offsets[1:]) < 100.0, offsets
    assert -100.0 < offsets[0] - min(offsets[1:]) < 500.0, offsets  # the first waits for its connection (110 ms on a busy box)
    # Each prompt's full 512-token blocks are named by the router's chained hashes: equal where the trace's ids were equal.
    first, third, sixth = rows[0].hash_ids, rows[2].hash_ids, rows[5].hash_ids
    assert len(first) == 2 and len(third) == 2 and len(sixth) == 2  # 1200 // 512, 1500 // 512, 1100 // 512
    assert first == third == sixth
    assert len(rows[1].hash_ids) == 1 and rows[1].hash_ids == rows[4].hash_ids != first[:1]  # one shared full block, another prefix
    assert rows[3].hash_ids == rows[6].hash_ids == []  # no full block
