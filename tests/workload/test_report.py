"""tierflow.workload.report against traces whose answers are worked out by hand.

numpy's linear percentile of n sorted values x[0..n-1] at q is x at rank q/100*(n-1),
interpolated: for 1..100 the p95 rank is 94.05, so p95 = 95 + 0.05 = 95.05.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from tierflow.workload.records import RequestRecord
from tierflow.workload.report import (
    REPORT_FORMAT,
    Percentiles,
    ReportError,
    ReportMeta,
    build_report,
    default_window_s,
    load_report,
    write_report,
)
from tierflow.workload.spec import Slo

META = ReportMeta("agentic.yaml", "sim", "hotness", 10.0, 0.5, "2025-01-01T00:00:00Z")
_ids = iter(range(1_000_000))


def rec(
    *,
    sent: float = 0.0,
    ttft_ms: float | None = 100.0,
    e2e_ms: float | None = 1000.0,
    tokens: int = 11,
    outcome: str = "ok",
    model: str = "m",
    session: str | None = None,
    node: str = "n1",
    tier: str = "hbm",
    prompt: int = 100,
    cached: int = 0,
) -> RequestRecord:
    """A request sent at `sent` whose first token and end come `ttft_ms` and `e2e_ms` later."""
    rid = next(_ids)
    return RequestRecord(
        request_id=f"r{rid}",
        session_id=session or f"s{rid}",
        tenant="t",
        flow="f",
        step=0,
        model=model,
        sent_at=sent,
        first_token_at=None if ttft_ms is None else sent + ttft_ms / 1e3,
        finished_at=None if e2e_ms is None else sent + e2e_ms / 1e3,
        prompt_tokens=prompt,
        completion_tokens=tokens,
        cached_tokens=cached,
        tier=tier,
        node=node,
        outcome=outcome,  # type: ignore[arg-type]
        status={"ok": 200, "error": 500, "rejected": 429}[outcome],
    )


def known_trace() -> list[RequestRecord]:
    """TTFT k ms, E2E 10k ms, 11 tokens (so ITL = 9k/10 ms), k = 1..100, all sent at 0."""
    return [rec(ttft_ms=float(k), e2e_ms=10.0 * k, tokens=11) for k in range(1, 101)]


def test_percentiles_of_a_trace_with_known_answers() -> None:
    totals = build_report(known_trace(), slo=Slo(), meta=META).totals
    assert totals.ttft_ms.p50 == pytest.approx(50.5)
    assert totals.ttft_ms.p95 == pytest.approx(95.05)
    assert totals.ttft_ms.p99 == pytest.approx(99.01)
    assert totals.ttft_ms.mean == pytest.approx(50.5)
    assert (totals.e2e_ms.p50, totals.e2e_ms.p95, totals.e2e_ms.p99) == pytest.approx((505.0, 950.5, 990.1))
    assert (totals.itl_ms.p50, totals.itl_ms.p95, totals.itl_ms.p99, totals.itl_ms.mean) == pytest.approx((45.45, 85.545, 89.109, 45.45))


def test_errors_and_rejections_count_but_stay_out_of_latency() -> None:
    trace = known_trace() + [
        rec(ttft_ms=9000.0, e2e_ms=9999.0, outcome="error"),
        rec(ttft_ms=None, e2e_ms=None, outcome="error", tokens=0),
        rec(ttft_ms=None, e2e_ms=None, outcome="rejected", tokens=0, node="", tier=""),
    ]
    totals = build_report(trace, slo=Slo(), meta=META).totals
    assert (totals.requests, totals.ok, totals.errors, totals.rejected) == (103, 100, 2, 1)
    assert (totals.ttft_ms.p50, totals.ttft_ms.p99) == pytest.approx((50.5, 99.01))
    assert totals.e2e_ms.p99 == pytest.approx(990.1)


def test_goodput_counts_requests_meeting_every_set_slo_over_all_sent() -> None:
    slo = Slo(ttft_ms=200, itl_ms=20, e2e_ms=2000)
    trace = [
        rec(ttft_ms=100, e2e_ms=1000, tokens=11),  # ITL 90 ms: fails ITL
        rec(ttft_ms=100, e2e_ms=200, tokens=11),  # ITL 10 ms: good
        rec(ttft_ms=200, e2e_ms=300, tokens=11),  # exactly at the TTFT target counts as meeting it: good
        rec(ttft_ms=300, e2e_ms=400, tokens=11),  # fails TTFT
        rec(ttft_ms=150, e2e_ms=150, tokens=1),  # one token: no ITL, meets the ITL target: good
        rec(ttft_ms=100, e2e_ms=2500, tokens=1000),  # ITL 2.4 ms, fails E2E
        rec(ttft_ms=None, e2e_ms=None, outcome="error", tokens=0),
        rec(ttft_ms=None, e2e_ms=None, outcome="rejected", tokens=0),
    ]
    totals = build_report(trace, slo=slo, meta=META).totals
    assert totals.goodput_share == pytest.approx(3 / 8)
    assert totals.goodput_rps == pytest.approx(0.3)  # 3 over the 10 s run
    assert totals.throughput_rps == pytest.approx(0.6)
    no_slo = build_report(trace, slo=Slo(), meta=META).totals
    assert no_slo.goodput_share == pytest.approx(6 / 8)  # without targets every ok request is good
    only_itl = build_report(trace, slo=Slo(itl_ms=20), meta=META).totals
    assert only_itl.goodput_share == pytest.approx(5 / 8)


def test_token_rates_cold_share_prefix_hits_and_nodes_per_session() -> None:
    trace = [
        rec(session="a", node="n1", tier="hbm", prompt=100, cached=50, tokens=10),
        rec(session="a", node="n1", tier="sram", prompt=300, cached=0, tokens=20),
        rec(session="a", node="n2", tier="ddr", prompt=100, cached=100, tokens=30),
        rec(session="b", node="n3", tier="cold", prompt=500, cached=0, tokens=40),
        rec(session="c", node="", tier="", prompt=0, cached=0, tokens=1),  # unknown tier and node
        rec(session="d", node="n1", tier="hbm", prompt=0, tokens=1),
        rec(session="d", node="n2", tier="hbm", prompt=0, tokens=1),
        rec(session="d", node="n3", tier="cold", outcome="error", ttft_ms=None, e2e_ms=None, prompt=1000, cached=1000, tokens=0),
    ]
    totals = build_report(trace, slo=Slo(), meta=META).totals
    assert totals.input_tokens_per_s == pytest.approx(100.0)  # 1000 prompt tokens of ok requests over 10 s; the error's excluded
    assert totals.output_tokens_per_s == pytest.approx(10.3)
    assert totals.cold_share == pytest.approx(2 / 6)  # ddr + cold over the 6 ok requests with a known tier
    assert totals.prefix_hit_rate == pytest.approx(150 / 1000)
    assert totals.prefix_hit_share == pytest.approx(2 / 7)
    # sessions with a known node: a -> {n1, n2}, b -> {n3}, d -> {n1, n2, n3} (the error still touched n3)
    assert totals.nodes_per_session == pytest.approx(2.0)
    assert totals.nodes_per_session_p95 == pytest.approx(2.9)  # [1, 2, 3] at rank 1.9
    assert totals.nodes_per_session_max == 3
    assert totals.sessions == 4


def test_per_model_summaries() -> None:
    trace = [rec(model="small", ttft_ms=float(k), session="s1", node=f"n{k // 10 % 2}") for k in (10, 20, 30)]  # n1, n0, n1
    trace += [
        rec(model="big", ttft_ms=500.0, session="s1", node="n9"),
        rec(model="big", outcome="rejected", ttft_ms=None, e2e_ms=None, node="", tier=""),
    ]
    report = build_report(trace, slo=Slo(ttft_ms=25), meta=META)
    assert list(report.per_model) == ["big", "small"]
    small, big = report.per_model["small"], report.per_model["big"]
    assert (small.requests, small.ttft_ms.p50, small.goodput_share, small.nodes_per_session) == (3, 20.0, pytest.approx(2 / 3), 2.0)
    assert (big.requests, big.ok, big.rejected, big.goodput_share, big.nodes_per_session) == (2, 1, 1, 0.0, 1.0)
    assert report.totals.nodes_per_session == 3.0  # s1 met n0, n1 and n9 across both models
    assert report.totals.goodput_share == pytest.approx(2 / 5)


def test_timeline_windows_are_keyed_by_send_time() -> None:
    meta = msgspec.structs.replace(META, duration_s=25.0)
    trace = [
        rec(sent=1.0, ttft_ms=10.0, tokens=5, prompt=10),
        rec(sent=2.0, ttft_ms=30.0, tokens=5, prompt=10, tier="cold"),
        rec(sent=9.5, ttft_ms=20.0, e2e_ms=60_000.0, tokens=5, prompt=10),  # finishes in window 6, counts in window 0
        rec(sent=21.0, ttft_ms=40.0, tokens=2, prompt=40, cached=10),
        rec(sent=25.0, ttft_ms=None, e2e_ms=None, outcome="rejected", tokens=0),  # at the horizon: last window
    ]
    report = build_report(trace, slo=Slo(ttft_ms=25.0), meta=meta, window_s=10.0)
    first, empty, last = report.timeline
    assert report.window_s == 10.0
    assert [(w.start, w.end) for w in report.timeline] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert (first.requests, first.ok, first.ttft_p50_ms, first.ttft_p95_ms) == (3, 3, pytest.approx(20.0), pytest.approx(29.0))
    assert first.e2e_p95_ms == pytest.approx(54_100.0)  # 1000, 1000, 60000 at rank 1.9
    assert first.goodput_share == pytest.approx(2 / 3)
    assert first.throughput_rps == pytest.approx(0.3)
    assert first.output_tokens_per_s == pytest.approx(1.5)
    assert first.cold_share == pytest.approx(1 / 3)
    assert (empty.requests, empty.ttft_p50_ms, empty.goodput_share, empty.cold_share, empty.throughput_rps) == (0, None, None, None, 0.0)
    assert (last.requests, last.ok, last.rejected) == (2, 1, 1)
    assert last.throughput_rps == pytest.approx(0.2)  # 1 ok request over the 5 s this window lasts
    assert last.input_tokens_per_s == pytest.approx(8.0)
    assert last.prefix_hit_rate == pytest.approx(0.25)
    assert last.nodes is None and last.queued is None  # no fleet timeline given


def test_fleet_timeline_is_a_time_weighted_step_mean_per_window() -> None:
    meta = msgspec.structs.replace(META, duration_s=30.0)
    samples = [(5.0, 4, 3, 2), (0.0, 2, 1, 0), (20.0, 10, 0, 0)]  # unsorted on purpose
    report = build_report([rec(sent=1.0)], slo=Slo(), meta=meta, window_s=10.0, fleet_timeline=samples)
    assert [(w.nodes, w.running, w.queued) for w in report.timeline] == [(3.0, 2.0, 1.0), (4.0, 3.0, 2.0), (10.0, 0.0, 0.0)]
    late = build_report([rec(sent=1.0)], slo=Slo(), meta=meta, window_s=10.0, fleet_timeline=[(15.0, 6, 0, 0)])
    assert [w.nodes for w in late.timeline] == [None, 6.0, 6.0]  # before the first sample nothing is known
    with pytest.raises(ReportError, match=r"\(t, nodes, running, queued\)"):
        build_report([rec()], slo=Slo(), meta=meta, fleet_timeline=[(0.0, 1, 2)])  # type: ignore[list-item]


@pytest.mark.parametrize(("duration", "window"), [(30, 1.0), (100, 2.0), (600, 10.0), (7200, 120.0), (36_000, 600.0), (1_000_000, 18_000.0)])
def test_default_window_is_about_a_sixtieth_rounded_up_to_a_nice_step(duration: float, window: float) -> None:
    assert default_window_s(duration) == window


def test_default_window_gives_at_most_sixty_windows() -> None:
    report = build_report([rec(sent=599.0)], slo=Slo(), meta=msgspec.structs.replace(META, duration_s=600.0))
    assert (report.window_s, len(report.timeline)) == (10.0, 60)


def test_no_records_gives_empty_figures_not_nan() -> None:
    report = build_report([], slo=Slo(ttft_ms=1), meta=META)
    totals = report.totals
    assert (totals.requests, totals.ttft_ms, totals.goodput_share, totals.cold_share, totals.nodes_per_session) == (0, Percentiles(), None, None, None)
    assert totals.throughput_rps == 0.0
    assert len(report.timeline) == 10 and all(w.requests == 0 for w in report.timeline)


def test_records_may_come_from_a_generator() -> None:
    report = build_report((r for r in known_trace()), slo=Slo(), meta=META)
    assert report.totals.ttft_ms.p95 == pytest.approx(95.05)


def test_a_run_without_duration_is_refused() -> None:
    with pytest.raises(ReportError, match="duration_s must be > 0"):
        build_report([rec()], slo=Slo(), meta=msgspec.structs.replace(META, duration_s=0.0))


def test_json_round_trip_keeps_every_figure_and_documents_itl(tmp_path: Path) -> None:
    report = build_report(known_trace() + [rec(outcome="rejected", ttft_ms=None, e2e_ms=None)], slo=Slo(ttft_ms=50), meta=META, window_s=5.0)
    path = write_report(report, tmp_path / "out" / "report.json")
    assert load_report(path) == report
    raw = json.loads(path.read_text())  # strict JSON: NaN would not parse as null
    assert raw["format"] == REPORT_FORMAT
    assert raw["timeline"][1]["ttft_p50_ms"] is None  # nothing was sent in [5, 10)
    assert "TPOT" in raw["definitions"]["itl_ms"]
    assert raw["slo"] == {"ttft_ms": 50, "itl_ms": None, "e2e_ms": None}
    assert path.read_text().startswith('{\n  "meta": {')  # indented


def test_load_report_says_which_file_is_wrong_and_why(tmp_path: Path) -> None:
    spec_like = tmp_path / "spec.json"
    spec_like.write_text('{"name": "x", "arrivals": []}')
    with pytest.raises(ReportError, match=r"spec\.json: not a tierflow workload report .*meta"):
        load_report(spec_like)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ReportError, match=r"broken\.json: not a tierflow workload report"):
        load_report(broken)
    report = build_report([rec()], slo=Slo(), meta=META)
    future = tmp_path / "future.json"
    future.write_bytes(msgspec.json.encode(msgspec.structs.replace(report, format="tierflow.workload.report/9")))
    with pytest.raises(ReportError, match="report/9"):
        load_report(future)
    with pytest.raises(ReportError, match="cannot read"):
        load_report(tmp_path / "missing.json")
