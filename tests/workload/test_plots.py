"""write_plots writes real PNGs: one per view, plus the fleet view only when the report has one."""

from __future__ import annotations

from pathlib import Path

from tierflow.workload.plots import write_plots
from tierflow.workload.records import RequestRecord
from tierflow.workload.report import Report, ReportMeta, build_report
from tierflow.workload.spec import Slo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(*, fleet: bool) -> Report:
    records = [
        RequestRecord(
            request_id=f"r{i}", session_id=f"s{i // 3}", tenant="t", flow="f", step=i % 3, model="m",
            sent_at=i * 0.5, first_token_at=i * 0.5 + 0.1 + 0.01 * (i % 7), finished_at=i * 0.5 + 1.0,
            prompt_tokens=200, completion_tokens=20, cached_tokens=100 * (i % 2), tier="hbm" if i % 4 else "ddr", node=f"n{i % 3}",
        )
        for i in range(40)
        if not 8 <= i * 0.5 < 12  # a gap: two windows with no sample must not break the plots
    ]  # fmt: skip
    meta = ReportMeta("agentic.yaml", "sim", "hotness", 20.0, 0.1, "2025-01-01T00:00:00Z")
    samples = [(0.0, 2, 1, 0), (10.0, 3, 5, 2)] if fleet else None
    return build_report(records, slo=Slo(ttft_ms=150), meta=meta, window_s=2.0, fleet_timeline=samples)


def test_writes_the_three_views_as_png(tmp_path: Path) -> None:
    paths = write_plots(report(fleet=False), tmp_path / "plots")
    assert [p.name for p in paths] == ["latency.png", "throughput.png", "cache.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a drawn figure, not an empty canvas


def test_adds_the_fleet_view_when_the_report_has_fleet_columns(tmp_path: Path) -> None:
    paths = write_plots(report(fleet=True), tmp_path)
    assert [p.name for p in paths] == ["latency.png", "throughput.png", "cache.png", "fleet.png"]
    assert (tmp_path / "fleet.png").read_bytes().startswith(PNG_MAGIC)

