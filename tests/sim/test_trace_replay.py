"""A trace replayed in the simulator: exactly the trace's requests, its arrivals second by second, its prefix sharing."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
from typer.testing import CliRunner

from tierflow.cli.main import app
from tierflow.cli.sim import read_fleet
from tierflow.sim import SimConfig, simulate
from tierflow.workload.records import RequestRecord
from tierflow.workload.replay import ReplayOptions, plan_replay
from tierflow.workload.report import ReportMeta, build_report, load_report
from tierflow.workload.spec import parse_spec
from tierflow.workload.trace_export import write_trace
from tierflow.workload.traces import TraceRow, parse_trace

FLEET = """\
models:
  - {name: small, versions: [{version: v1, catalog: llama-3.1-8b}]}
  - {name: moe, versions: [{version: v1, catalog: gpt-oss-20b}]}
bundles:
  - name: pair
    models: [{model: small, config: ss8192-bs4}, {model: moe, config: ss8192-bs4}]
deployments:
  - {name: pair, bundle: pair, replicas: 1, min_replicas: 1, max_replicas: 1, profile: sn40l-16}
"""

# (seconds since the first row, input tokens, output tokens): 3, 0, 4, 1, 2 arrivals in seconds 0-4.
ROWS = [
    (0.0, 900, 12), (0.25, 40, 3), (0.9, 2100, 20),
    (2.0, 700, 5), (2.1, 13, 1), (2.5, 1500, 9), (2.99, 333, 7),
    (3.5, 1024, 16),
    (4.0, 512, 4), (4.75, 4000, 2),
]  # fmt: skip
PER_SECOND = [3, 0, 4, 1, 2]


def _mooncake(rows: list[tuple[float, int, int]]) -> bytes:
    return b"".join(f'{{"timestamp": {t * 1000:g}, "input_length": {i}, "output_length": {o}}}\n'.encode() for t, i, o in rows)


def _azure(rows: list[tuple[float, int, int]]) -> bytes:
    times = [f"2023-11-16 18:15:{46 + math.floor(t):02d}.{round((t % 1) * 1e7):07d}" for t, _, _ in rows]
    return b"TIMESTAMP,ContextTokens,GeneratedTokens\n" + b"".join(f"{s},{i},{o}\n".encode() for s, (_, i, o) in zip(times, rows))


def _burstgpt(rows: list[tuple[float, int, int]]) -> bytes:
    lines = [f"{100 + t:g},{'ChatGPT' if k % 2 else 'GPT-4'},{i},{o},{i + o},Conversation log\n" for k, (t, i, o) in enumerate(rows)]
    return b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + "".join(lines).encode()


def _tierflow(rows: list[tuple[float, int, int]]) -> bytes:
    encoded = [TraceRow(timestamp=t * 1000, input_length=i, output_length=o, model="moe", session_id=f"acme/s{k % 3}", tenant="acme")
               for k, (t, i, o) in enumerate(rows)]  # fmt: skip
    return b"".join(msgspec.json.encode(r) + b"\n" for r in encoded)


SPECS = {
    "mooncake": "name: m\ntrace: {mix: [{model: small, weight: 1}, {model: moe, weight: 1}], sticky: row}\n",
    "azure": "name: a\ntrace: {mix: [{model: small}]}\n",
    "burstgpt": "name: b\ntrace: {models: {ChatGPT: small, GPT-4: moe}}\n",
    "tierflow": "name: t\ntenants: [{name: acme, api_key: sk-acme}]\ntrace: {}\n",
}
WRITERS = {"mooncake": _mooncake, "azure": _azure, "burstgpt": _burstgpt, "tierflow": _tierflow}
# A trace's row k is on line k + 1 (JSON lines) or k + 2 (under a CSV header); its request is named r<line>.
FIRST_LINE = {"mooncake": 1, "azure": 2, "burstgpt": 2, "tierflow": 1}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    path.write_text(FLEET)
    return read_fleet(path)


def _replay(fleet, fmt: str, data: bytes, options: ReplayOptions = ReplayOptions()) -> tuple[list[RequestRecord], object]:  # type: ignore[no-untyped-def]
    spec = parse_spec(SPECS[fmt])
    replay = plan_replay(parse_trace(data, source=f"t.{fmt}"), spec, options)
    result = simulate(spec, fleet, SimConfig(autoscale=False), plans=replay.plans)
    return result.records, replay


@pytest.mark.parametrize("fmt", ["mooncake", "azure", "burstgpt", "tierflow"])
def test_a_replay_sends_exactly_the_traces_requests(fleet, fmt: str) -> None:  # type: ignore[no-untyped-def]
    records, _ = _replay(fleet, fmt, WRITERS[fmt](ROWS))
    assert len(records) == len(ROWS) and all(r.outcome == "ok" for r in records)
    arrivals = Counter(math.floor(r.sent_at) for r in records)
    assert [arrivals[s] for s in range(len(PER_SECOND))] == PER_SECOND
    by_line = {int(r.request_id.split("-")[0][1:]): r for r in records}
    for k, (t, tokens_in, tokens_out) in enumerate(ROWS):
        record = by_line[FIRST_LINE[fmt] + k]
        assert record.sent_at == pytest.approx(t, abs=1e-6)
        assert (record.prompt_tokens, record.completion_tokens) == (tokens_in, tokens_out)
    if fmt == "burstgpt":
        assert {r.model for r in records} == {"small", "moe"}
    if fmt == "tierflow":
        assert {r.session_id for r in records} == {"acme/s0", "acme/s1", "acme/s2"} and {r.tenant for r in records} == {"acme"}


def test_speed_and_rate_scale_shape_the_arrivals(fleet) -> None:  # type: ignore[no-untyped-def]
    records, _ = _replay(fleet, "mooncake", _mooncake(ROWS), ReplayOptions(speed=2.0, rate_scale=2.0))
    assert len(records) == 2 * len(ROWS)
    arrivals = Counter(math.floor(r.sent_at) for r in records)
    # Each row at twice the speed, and its copy halfway to the next row: 0.9 s -> 0.45 s, its copy
    # at 0.725 s; 2.99 s -> 1.495 s, its copy at 1.6225 s; the last row's copy comes with it.
    assert [arrivals[s] for s in range(3)] == [6, 10, 4]
    assert sorted(r.prompt_tokens for r in records) == sorted(2 * [i for _, i, _ in ROWS])


# Rows 3 s apart (each done before the next arrives) that share 512-token prefix blocks in
# every way that matters: whole prompts, a trunk with branches, a row that ends inside a
# shared block, one that ends at its edge, a text that ends 57+ tokens into a 64-token block.
SHARED = [
    (4000, [1, 2, 3, 4, 5, 6, 7, 8]), (4000, [1, 2, 3, 4, 5, 6, 7, 8]), (2600, [1, 2, 3, 9, 10, 11]),
    (1100, [1, 2, 12]), (1031, [1, 2, 13]), (1600, [1, 2, 3, 14]), (2600, [1, 2, 3, 9, 10, 15]),
    (575, [20, 21]), (575, [20, 21]), (1024, [1, 2]), (3000, [30, 31, 32, 33, 34, 35]), (700, [1, 40]),
    (1027, [50, 51, 52]), (1027, [50, 51, 52]),
]  # fmt: skip


def test_prefix_sharing_survives_the_replay_exactly(fleet) -> None:  # type: ignore[no-untyped-def]
    data = b"".join(f'{{"timestamp": {3000 * k}, "input_length": {i}, "output_length": 8, "hash_ids": {ids}}}\n'.encode()
                    for k, (i, ids) in enumerate(SHARED))  # fmt: skip
    spec = parse_spec("name: shared\ntrace: {mix: [{model: small}]}\n")
    replay = plan_replay(parse_trace(data, source="shared.jsonl"), spec, ReplayOptions())
    records = simulate(spec, fleet, SimConfig(autoscale=False), plans=replay.plans).records
    assert all(r.outcome == "ok" for r in records)
    cached, prompt = sum(r.cached_tokens for r in records), sum(r.prompt_tokens for r in records)
    expected = replay.summary.source.prefix_reuse
    assert expected is not None and 0.4 < expected < 0.8
    assert cached / prompt == expected  # exact: the same integers
    report = build_report(records, slo=spec.slo, trace=replay.summary,
                          meta=ReportMeta(spec="shared", source="sim", policy="hotness", duration_s=replay.duration_s, wall_s=1.0, started_at="-"))  # fmt: skip
    assert report.trace is not None and report.trace.measured is not None
    assert report.trace.measured.prefix_reuse == report.totals.prefix_hit_rate == expected


def test_the_fabrics_own_trace_round_trips(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Exported rows (what `export-trace` writes) replay as the same requests at the same times."""
    rows = [TraceRow(timestamp=250.0 * k, input_length=600 + 97 * k, output_length=3 + k, hash_ids=[k % 2] if k > 1 else [],
                     model="small" if k % 3 else "moe", session_id=f"acme/s{k % 2}", tenant="acme") for k in range(9)]  # fmt: skip
    path = write_trace(rows, tmp_path / "own.jsonl")
    records, _ = _replay(fleet, "tierflow", path.read_bytes())
    records.sort(key=lambda r: r.sent_at)
    assert [(round(r.sent_at * 1000, 6), r.prompt_tokens, r.completion_tokens, r.model, r.session_id) for r in records] == [
        (row.timestamp, row.input_length, row.output_length, row.model, row.session_id) for row in rows
    ]


def test_tierflow_sim_replays_a_trace_and_reports_it(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET)
    (tmp_path / "spec.yaml").write_text(SPECS["azure"])
    (tmp_path / "trace.csv").write_bytes(_azure(ROWS))
    result = CliRunner().invoke(app, ["sim", str(tmp_path / "spec.yaml"), "--fleet", str(tmp_path / "fleet.yaml"), "--trace",
                                      str(tmp_path / "trace.csv"), "--no-autoscale", "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "prefix reuse" in result.output and "measured" in result.output
    report = load_report(tmp_path / "r.json")
    assert report.trace is not None and report.trace.measured is not None and report.meta.duration_s == 4.75
    trace = report.trace
    assert trace.measured.requests == trace.sent.requests == trace.source.requests == len(ROWS)
    assert trace.measured.input_tokens == trace.source.input_tokens and trace.measured.output_tokens == trace.source.output_tokens
    assert trace.measured.rate_peak == trace.source.rate_peak == 4
    assert report.meta.notes["trace_format"] == "azure"
    (tmp_path / "bad.csv").write_bytes(_azure(ROWS) + b"2023-11-16 18:15:59,-3,1\n")
    result = CliRunner().invoke(app, ["sim", str(tmp_path / "spec.yaml"), "--fleet", str(tmp_path / "fleet.yaml"), "--trace",
                                      str(tmp_path / "bad.csv"), "--out", str(tmp_path / "bad.json")])  # fmt: skip
    assert result.exit_code == 2 and f"{tmp_path / 'bad.csv'}:12: column 2 `ContextTokens`" in result.output
    assert not (tmp_path / "bad.json").exists()
    assert np.isclose(trace.sent.rate_mean or 0.0, len(ROWS) / 4.75)
