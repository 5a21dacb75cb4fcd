"""`tierflow loadtest run` refuses, before any request, a spec it cannot run (the run itself: tests/fabric)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tierflow.cli.main import app

RUNNER = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = RUNNER.invoke(app, ["loadtest", "run", *args])
    return result.exit_code, result.output


def test_a_bad_spec_exits_2_listing_its_problems(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\narrivals: [{kind: bursts, rate: 1, duration_s: 5}]\nflows: [{name: f, steps: [{}]}]\n")
    code, output = _run(str(spec), "--out", str(tmp_path / "r.json"))
    assert code == 2
    assert "$.arrivals[0]: kind 'bursts' needs burst_rate, every_s and burst_s" in output
    assert "$.flows[0].steps[0]: has neither `model` nor `tool`" in output
    assert not (tmp_path / "r.json").exists()


def test_a_missing_file_or_an_empty_run_exits_2(tmp_path: Path) -> None:
    code, output = _run(str(tmp_path / "none.yaml"))
    assert code == 2 and "cannot read: No such file or directory" in output
    spec = tmp_path / "quiet.yaml"
    spec.write_text("name: q\narrivals: [{kind: poisson, rate: 0.001, duration_s: 1}]\nmix: {models: [{model: m}]}\n")
    code, output = _run(str(spec), "--seed", "1")
    assert code == 2 and "no session arrives within 1 s" in output
