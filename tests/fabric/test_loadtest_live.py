"""`tierflow loadtest run` against the README's fabric: every planned call answered, measured and reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tierflow.runtime.nats_server import free_port
from tierflow.workload.report import load_report

pytestmark = pytest.mark.fabric

# 10 sessions (4/s for 2.5 s), each: a planner call, a tool step, a writer call -> 20 requests.
TINY = """\
name: live-tiny
seed: 5
tenants:
  - {name: t1, api_key: k1, weight: 1, workload: interactive}
  - {name: t2, api_key: k2, weight: 1}
flows:
  - name: two-step
    task_tokens: 40
    steps:
      - {model: llama-3.1-8b, role: planner, system_tokens: 200, max_tokens: 12}
      - {tool: lookup, latency_s: 0.1, output_tokens: 20}
      - {model: gpt-oss-20b, role: writer, system_tokens: 200, max_tokens: 16}
arrivals: [{kind: steady, rate: 4, duration_s: 2.5}]
"""
# Each message costs its content plus 7 template tokens (`<|role|>`, two newlines); the prompt ends with a 6-token cue.
PLANNER_PROMPT = (7 + 200) + (7 + 40) + 6
WRITER_PROMPT = (7 + 200) + (7 + 40) + (7 + 12) + (7 + 20) + 6


def _loadtest(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tierflow", "loadtest", "run", *map(str, args)], capture_output=True, text=True, timeout=90)


def test_a_tiny_spec_runs_end_to_end_and_reports_what_happened(fabric, tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = _loadtest(spec, "--url", fabric.base_url, "--out", tmp_path / "report.json", "--plots", tmp_path / "plots", "--policy-label", "hotness")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wrote" in out.stdout and "live-tiny" in out.stdout

    report = load_report(tmp_path / "report.json")
    totals = report.totals
    assert (totals.requests, totals.ok, totals.errors, totals.rejected, totals.sessions) == (20, 20, 0, 0, 10)
    assert report.meta.source == "live" and report.meta.policy == "hotness" and report.meta.duration_s == 2.5
    assert report.meta.notes["planned_calls"] == 20 and report.meta.notes["skipped_calls"] == 0
    assert sorted(report.per_model) == ["gpt-oss-20b", "llama-3.1-8b"]
    assert report.per_model["llama-3.1-8b"].requests == report.per_model["gpt-oss-20b"].requests == 10
    # Exact token counts: the fabric's usage matches the plan (ignore_eos: exactly max_tokens out).
    assert totals.input_tokens_per_s * 2.5 == pytest.approx(10 * (PLANNER_PROMPT + WRITER_PROMPT))
    assert totals.output_tokens_per_s * 2.5 == pytest.approx(10 * (12 + 16))
    # Tier and node came back in the headers of every answer.
    assert totals.cold_share is not None and totals.nodes_per_session is not None and 1 <= totals.nodes_per_session <= 2
    # Ten sessions share each role's system prompt: later ones find it in the prefix cache.
    for model in ("llama-3.1-8b", "gpt-oss-20b"):
        assert (report.per_model[model].prefix_hit_rate or 0.0) > 0.0
    assert totals.ttft_ms.p50 is not None and totals.itl_ms.p50 is not None
    assert sorted(p.suffix for p in (tmp_path / "plots").iterdir()) and all(p.stat().st_size > 0 for p in (tmp_path / "plots").iterdir())


def test_an_unreachable_fabric_or_a_missing_model_stops_before_the_run(fabric, tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.replace("gpt-oss-20b", "no-such-model"))
    out = _loadtest(spec, "--url", fabric.base_url, "--out", tmp_path / "r.json")
    assert out.returncode == 2 and "does not serve no-such-model" in out.stderr
    out = _loadtest(spec, "--url", f"http://127.0.0.1:{free_port()}/v1", "--out", tmp_path / "r.json")
    assert out.returncode == 2 and "is the fabric up" in out.stderr
    assert not (tmp_path / "r.json").exists()


def test_the_same_spec_runs_over_grpc(fabric, tmp_path: Path) -> None:
    """`--grpc`: the calls go over tierflow.v1.Inference; tokens and nodes are measured the
    same way, the tier (not in gRPC replies) stays unknown."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = _loadtest(spec, "--url", fabric.base_url, "--grpc", f"127.0.0.1:{fabric.grpc_port}", "--out", tmp_path / "grpc.json")
    assert out.returncode == 0, out.stdout + out.stderr
    totals = load_report(tmp_path / "grpc.json").totals
    assert (totals.requests, totals.ok, totals.errors, totals.rejected) == (20, 20, 0, 0)
    assert totals.input_tokens_per_s * 2.5 == pytest.approx(10 * (PLANNER_PROMPT + WRITER_PROMPT))
    assert totals.output_tokens_per_s * 2.5 == pytest.approx(10 * (12 + 16))
    assert totals.ttft_ms.p50 is not None and totals.nodes_per_session is not None
    assert totals.cold_share is None  # no tier over gRPC
