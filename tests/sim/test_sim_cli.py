"""`tierflow sim`: files in, the same report as `tierflow loadtest run` out; bad input exits 2."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tierflow.cli.main import app
from tierflow.workload.report import load_report

RUNNER = CliRunner()

FLEET = """
models:
  - {name: small, versions: [{version: v1, catalog: llama-3.1-8b}]}
  - {name: moe, versions: [{version: v1, catalog: gpt-oss-20b}]}
bundles:
  - name: pair
    models: [{model: small, config: ss8192-bs4}, {model: moe, config: ss8192-bs4}]
deployments:
  - {name: default, bundle: pair, replicas: 2, min_replicas: 1, max_replicas: 3, profile: sn40l-16}
"""

SPEC = """
name: cli-small
seed: 3
slo: {ttft_ms: 1000}
flows:
  - name: agent
    task_tokens: 200
    steps:
      - {model: small, role: planner, system_tokens: 100, max_tokens: 16}
      - {model: moe, role: writer, system_tokens: 100, max_tokens: 32}
arrivals:
  - {kind: poisson, rate: 2.0, duration_s: 60}
"""


def _files(tmp_path: Path, spec: str = SPEC) -> tuple[Path, Path]:
    (tmp_path / "spec.yaml").write_text(spec)
    (tmp_path / "fleet.yaml").write_text(FLEET)
    return tmp_path / "spec.yaml", tmp_path / "fleet.yaml"


def test_a_run_writes_a_report_and_plots_and_prints_a_summary(tmp_path: Path) -> None:
    spec, fleet = _files(tmp_path)
    out, plots = tmp_path / "report.json", tmp_path / "plots"
    result = RUNNER.invoke(
        app, ["sim", str(spec), "--fleet", str(fleet), "--duration", "20", "--policy", "round-robin", "--out", str(out), "--plots", str(plots)]
    )
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert (report.meta.source, report.meta.policy, report.meta.spec, report.meta.duration_s) == ("sim", "round-robin", "cli-small", 20.0)
    assert report.totals.requests == report.totals.ok > 40
    assert set(report.per_model) == {"small", "moe"}
    assert report.meta.notes["nodes_initial"] == 2 and 15 < report.meta.notes["virtual_s"] < 30  # until the last session ends
    assert any(w.nodes == 2 for w in report.timeline)  # the fleet's columns come from the simulator
    assert sorted(p.name for p in plots.iterdir()) == ["cache.png", "fleet.png", "latency.png", "throughput.png"]
    assert "cli-small: simulated, policy round-robin" in result.output and "all" in result.output
    # Energy (issue 19): tokens per kWh per model and for the fleet, on sn40l-16's published power.
    for summary in (*report.per_model.values(), report.totals):
        assert summary.energy_j > 0 and summary.tokens_per_kwh is not None and summary.tokens_per_kwh > 0
    fleet_per_kwh = report.meta.notes["tokens_per_kwh"]
    # The fleet also pays for weight loads and idle power (none published, none loaded here): no more per kWh
    assert 0 < fleet_per_kwh <= report.totals.tokens_per_kwh + 1
    assert "output tokens/kWh" in result.output and "tok/" in result.output


def test_nodes_rescale_the_fleet(tmp_path: Path) -> None:
    spec, fleet = _files(tmp_path)
    out = tmp_path / "report.json"
    result = RUNNER.invoke(app, ["sim", str(spec), "--fleet", str(fleet), "--duration", "5", "--nodes", "6", "--no-autoscale", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_report(out).meta.notes["nodes_initial"] == 6


def test_unusable_input_exits_2_saying_what_is_wrong(tmp_path: Path) -> None:
    spec, fleet = _files(tmp_path, SPEC.replace("model: moe", "model: missing"))
    out = tmp_path / "report.json"
    result = RUNNER.invoke(app, ["sim", str(spec), "--fleet", str(fleet), "--out", str(out)])
    assert result.exit_code == 2
    assert "$.flows[0].steps[1].model: 'missing' is not deployed by the fleet (deployed: moe, small)" in result.output
    result = RUNNER.invoke(app, ["sim", str(spec), "--fleet", str(fleet), "--hours", "1", "--duration", "5"])
    assert result.exit_code == 2 and "give --hours or --duration, not both" in result.output
    result = RUNNER.invoke(app, ["sim", str(spec), "--fleet", str(fleet), "--policy", "fastest"])
    assert result.exit_code == 2 and "unknown --policy 'fastest'" in result.output
    result = RUNNER.invoke(app, ["sim", str(spec), "--fleet", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.output
    assert not out.exists()
