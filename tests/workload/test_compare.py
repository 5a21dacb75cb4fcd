"""compare_table and `tierflow loadtest compare`: two reports with known figures, side by side."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from tierflow.cli.main import app
from tierflow.workload.compare import compare_table
from tierflow.workload.records import RequestRecord
from tierflow.workload.report import Report, ReportMeta, build_report, write_report
from tierflow.workload.spec import Slo


def report(source: str, policy: str, ttft_ms: float, *, model: str = "m", slo: Slo = Slo(ttft_ms=150)) -> Report:
    """Ten ok requests over 10 s, each with the same TTFT, 500 ms E2E and 11 tokens."""
    records = [
        RequestRecord(
            request_id=f"r{i}", session_id=f"s{i}", tenant="t", flow="f", step=0, model=model,
            sent_at=float(i), first_token_at=i + ttft_ms / 1e3, finished_at=i + 0.5,
            prompt_tokens=100, completion_tokens=11, tier="hbm", node="n1",
        )
        for i in range(10)
    ]  # fmt: skip
    meta = ReportMeta("agentic.yaml", source, policy, 10.0, 2.0, "2025-01-01T00:00:00Z")  # type: ignore[arg-type]
    return build_report(records, slo=slo, meta=meta)


def render(a: Report, b: Report) -> str:
    console = Console(record=True, width=200)
    console.print(compare_table(a, b))
    return console.export_text()


def row(text: str, metric: str) -> list[str]:
    """The cells (metric, A, B, B/A) of the first row for `metric`."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0] == metric:
            return cells
    raise AssertionError(f"no row {metric!r} in:\n{text}")


def test_table_shows_both_reports_and_the_ratio() -> None:
    text = render(report("live", "affinity", 100.0), report("sim", "round-robin", 200.0))
    assert "A: live affinity" in text and "B: sim round-robin" in text
    assert "workload report: agentic.yaml" in text
    assert "A = live, policy affinity, 10 s, started 2025-01-01T00:00:00Z" in text
    assert row(text, "TTFT p50") == ["TTFT p50", "100.0 ms", "200.0 ms", "2.00x"]
    assert row(text, "goodput share") == ["goodput share", "100.0%", "0.0%", "0.00x"]  # B's 200 ms TTFTs miss the 150 ms target
    assert row(text, "requests") == ["requests", "10", "10", "1.00x"]
    assert row(text, "throughput") == ["throughput", "1.00/s", "1.00/s", "1.00x"]
    assert row(text, "ITL (TPOT) p50") == ["ITL (TPOT) p50", "40.0 ms", "30.0 ms", "0.75x"]
    assert "model m" in text


def test_ratio_is_dash_when_a_is_zero_or_missing_and_models_of_either_side_show() -> None:
    a, b = report("sim", "p", 100.0, model="small"), report("sim", "q", 100.0, model="big")
    text = render(a, b)
    assert row(text, "errors") == ["errors", "0", "0", "-"]
    assert "model big" in text and "model small" in text


def test_caption_warns_when_slos_differ() -> None:
    text = render(report("sim", "p", 100.0), report("sim", "p", 100.0, slo=Slo(ttft_ms=50)))
    assert "SLO A: ttft_ms<=150   SLO B: ttft_ms<=50" in text
    assert "the SLOs differ: goodput figures are not comparable" in text


def test_cli_compare_prints_the_table_and_refuses_a_non_report(tmp_path: Path) -> None:
    a = write_report(report("live", "affinity", 100.0), tmp_path / "a.json")
    b = write_report(report("sim", "affinity", 300.0), tmp_path / "b.json")
    result = CliRunner().invoke(app, ["loadtest", "compare", str(a), str(b)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "3.00x" in result.output and "TTFT p95" in result.output
    bogus = tmp_path / "bogus.json"
    bogus.write_text("[]")
    result = CliRunner().invoke(app, ["loadtest", "compare", str(a), str(bogus)])
    assert result.exit_code == 2
    assert "bogus.json: not a tierflow workload report" in result.output
