"""`tierflow loadtest run --trace` refuses, before any request, a trace or options it cannot replay."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tierflow.cli.main import app
from tierflow.runtime.nats_server import free_port

SPEC = "name: replay\ntrace: {mix: [{model: llama-3.1-8b}]}\n"


def _run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["loadtest", "run", *map(str, args)])
    return result.exit_code, result.output


def _files(tmp_path: Path, trace: str) -> tuple[Path, Path]:
    spec, data = tmp_path / "spec.yaml", tmp_path / "trace.jsonl"
    spec.write_text(SPEC)
    data.write_text(trace)
    return spec, data


def test_a_malformed_row_names_its_line_and_field_and_nothing_is_sent(tmp_path: Path) -> None:
    spec, data = _files(tmp_path, '{"timestamp": 0, "input_length": 50, "output_length": 2}\n{"timestamp": 1, "input_length": 50, "output_length": "x"}\n')
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: reaching the fabric would be a different error
    code, output = _run(spec, "--trace", data, "--url", url, "--out", tmp_path / "r.json")
    assert code == 2
    assert f"{data}:2: field `output_length`: Expected `int`, got `str`" in output
    assert "is the fabric up" not in output and not (tmp_path / "r.json").exists()


def test_time_controls_need_a_trace_and_a_trace_has_no_duration(tmp_path: Path) -> None:
    spec, data = _files(tmp_path, '{"timestamp": 0, "input_length": 50, "output_length": 2}\n')
    synthetic = tmp_path / "synthetic.yaml"
    synthetic.write_text("name: s\narrivals: [{kind: steady, rate: 1, duration_s: 1}]\nmix: {models: [{model: m}]}\n")
    code, output = _run(synthetic, "--window", "0:10", "--speed", "2")
    assert code == 2 and "--window, --speed only apply to a trace replay: give --trace FILE" in output
    code, output = _run(spec, "--trace", data, "--duration", "5")
    assert code == 2 and "use --window START:DURATION" in output
    code, output = _run(spec, "--trace", data, "--format", "parquet")
    assert code == 2 and "unknown --format 'parquet'" in output
    code, output = _run(spec, "--trace", data, "--window", "5:5")
    assert code == 2 and "the window starts at 5 s, after the trace's last row (0 s after its first)" in output


def test_the_spec_names_its_trace_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-01-01 00:00:00,oops,1\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: r\ntrace: {file: traces/t.csv, mix: [{model: m}]}\n")
    code, output = _run(spec)
    assert code == 2 and f"{tmp_path / 'traces' / 't.csv'}:2: column 2 `ContextTokens`" in output
    spec.write_text("name: r\ntrace: {mix: [{model: m}]}\n")
    code, output = _run(spec)
    assert code == 2 and "the `trace:` section names no file; give --trace FILE or trace.file" in output
