"""The placement suite (loadtest/placement_suite.py, issue 17) end to end on a tiny window, its
saturation search on a stand-in simulator, its capacity figure, and the report's nodes per
(session, model) it prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))

import placement_suite
from placement_suite import Capacity, Run, Setup, find_saturation
from tierflow.rdu import BUILTIN_MODELS
from tierflow.rdu.engine import DEFAULT_KV_CACHE_FRACTION
from tierflow.rdu.hardware import BUILTIN_PROFILES
from tierflow.workload.records import RequestRecord
from tierflow.workload.report import ReportMeta, build_report
from tierflow.workload.spec import Slo


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--minutes", "0.5", "--shapes", "chat", "--policies", "round-robin,hotness", "--jobs", "1",
        "--out", str(tmp_path / "traces"), "--json", str(tmp_path / "suite.json"), "--png", str(tmp_path / "suite.png"), *extra,
    ]  # fmt: skip


def test_the_suite_runs_end_to_end_on_a_tiny_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert placement_suite.main(_tiny(tmp_path, "--saturation", "chat=3")) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "suite.json").read_text())
    runs = data["runs"]
    assert [(r["load"], r["policy"]) for r in runs] == [("low", "round-robin"), ("low", "hotness"), ("high", "round-robin"), ("high", "hotness")]
    assert data["saturation"]["chat"]["scale"] == 3.0 and data["saturation"]["chat"]["source"] == "given"
    for run in runs:
        assert run["requests"] > 0 and run["ttft_p50_ms"] <= run["ttft_p95_ms"] <= run["ttft_p99_ms"]
        assert 0.0 < run["realized"] <= run["reusable"] + 1e-9  # no policy beats a cache that never evicts
        assert 1.0 <= run["nodes_per_conversation_model"] <= run["nodes_per_conversation"]
    low, high = runs[0], runs[2]
    assert high["scale"] == pytest.approx(3.0 * 0.8) and low["scale"] == pytest.approx(3.0 * 0.25)
    assert high["requests"] > 2 * low["requests"]  # the high load is the same shape at a higher rate
    # one table, the checks as lines, the wall time
    assert printed.count("TTFT p50") == 1 and "round-robin" in printed and "hotness" in printed
    assert sum(line.startswith(("PASS", "FAIL", "SKIP")) for line in printed.splitlines()) == 4
    assert "wall time" in printed and (tmp_path / "suite.png").stat().st_size > 10_000
    # a rerun takes the saturation from the JSON instead of searching
    assert placement_suite.main(_tiny(tmp_path, "--saturation-from", str(tmp_path / "suite.json"))) == 0
    again = json.loads((tmp_path / "suite.json").read_text())
    assert again["saturation"]["chat"]["scale"] == 3.0 and again["saturation"]["chat"]["source"].endswith("suite.json")
    assert [r["requests"] for r in again["runs"]] == [r["requests"] for r in runs]  # the same traces, the same runs


def test_the_capacity_figure_is_the_engines_kv_pool(tmp_path: Path) -> None:
    setup = Setup(
        minutes=0.5, max_requests=12_000, nodes=16, seed=7, models="column", router_sessions=False,
        spec=str(LOADTEST / "specs" / "conversation.yaml"), fleet=str(LOADTEST / "fleets" / "conversation-16.yaml"), out=str(tmp_path),
    )  # fmt: skip
    replay, conversation = placement_suite._replay(setup, "conversation", 1.0)
    cap = placement_suite.capacity(setup, replay)
    pool = int(BUILTIN_PROFILES["sn40l-16"].hbm_capacity * DEFAULT_KV_CACHE_FRACTION)
    assert cap.hbm_bytes == 16 * pool and cap.ddr_bytes == 2 * cap.hbm_bytes
    llama = cap.per_model["llama-3.1-8b"]
    assert llama.kv_bytes_per_token == BUILTIN_MODELS["llama-3.1-8b"].kv_bytes_per_token
    assert llama.hbm_tokens == 16 * pool // llama.kv_bytes_per_token
    for model in cap.per_model.values():
        assert 0 < model.peak_live_tokens <= model.reusable_tokens  # conversations come back within half a minute
    assert cap.fits
    assert set(conversation.values()) <= {f"conversation-{n}" for n in range(100_000)}  # every plan found its conversation


def test_the_search_keeps_the_highest_load_round_robin_copes_with(monkeypatch: pytest.MonkeyPatch) -> None:
    knee = 5.3
    asked: list[float] = []

    def fake(setup: Setup, shape: str, load: str, scale: float, policy: str) -> Run:
        assert policy == "round-robin"
        asked.append(scale)
        share = 0.99 if scale <= knee else 0.6
        empty = Capacity(hbm_bytes=0, ddr_bytes=0, peak_live_bytes=0, per_model={})
        return Run(
            shape=shape, load=load, scale=scale, policy=policy, requests=1, rate=1.0, window_s=1.0, ttft_p50_ms=1.0, ttft_p95_ms=1.0,
            ttft_p99_ms=1.0, goodput=share, within_ttft_slo=share, cold=0.0, realized=0.0, reusable=0.0, reusable_blind=0.0,
            nodes_per_conversation=1.0, nodes_per_conversation_model=1.0, utilisation=min(1.0, scale / 7.0), capacity=empty, wall_s=0.0,
        )  # fmt: skip

    monkeypatch.setattr(placement_suite, "simulate", fake)
    setup = Setup(minutes=1, max_requests=12_000, nodes=16, seed=7, models="column", router_sessions=False, spec="", fleet="", out="")
    found = find_saturation(setup, "chat")
    assert knee / 1.2 < found.scale <= knee  # bisected to a bracket 1.2x wide
    assert len(asked) <= 8 and [p.scale for p in found.probes] == asked


def _record(session: str, node: str, model: str) -> RequestRecord:
    return RequestRecord(
        request_id=f"{session}-{node}-{model}", session_id=session, tenant="t", flow="f", step=0, model=model,
        sent_at=0.0, first_token_at=0.1, finished_at=0.2, prompt_tokens=10, completion_tokens=2, node=node,
    )  # fmt: skip


def test_the_report_counts_nodes_per_session_and_model() -> None:
    records = [
        _record("s1", "n1", "a"), _record("s1", "n2", "b"), _record("s1", "n1", "a"),  # one node per model: 2 nodes, 1 per model
        _record("s2", "n1", "a"), _record("s2", "n2", "a"), _record("s2", "", "a"),  # one model over two nodes (and an unknown one)
    ]  # fmt: skip
    report = build_report(records, slo=Slo(), meta=ReportMeta(spec="x", source="sim", policy="p", duration_s=1.0, wall_s=1.0, started_at=""))
    totals = report.totals
    assert totals.nodes_per_session == pytest.approx(2.0)
    assert totals.nodes_per_session_model == pytest.approx((1 + 1 + 2) / 3) and totals.nodes_per_session_model_max == 2
    assert report.per_model["a"].nodes_per_session_model == pytest.approx(1.5)
    assert report.per_model["b"].nodes_per_session_model == pytest.approx(1.0)
