"""`tierflow emulator calibrate`: the table, and the exit code CI keys on."""

from __future__ import annotations

import json

import msgspec
import pytest
from typer.testing import CliRunner

import tierflow.cli.emulator as cli
from tierflow.rdu import BUILTIN_PROFILES
from tierflow.rdu.calibrate import calibration_rows
from tierflow.rdu.figures import FIGURES


def test_calibrate_prints_every_figure_its_loo_error_and_energy() -> None:
    result = CliRunner().invoke(cli.app, ["calibrate"], env={"COLUMNS": "200"})
    # exit 1: the two 8-socket TTFT figures miss leave-one-out (see test_rdu_timing)
    assert result.exit_code == 1, result.output
    for model in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "deepseek-r1", "gpt-oss-120b"):
        assert model in result.output
    assert "LOO error" in result.output and "switch speed-up vs DGX A100" in result.output
    assert "5 free parameters" in result.output and "fit 11 figures" in result.output
    assert "output tok/kWh" in result.output and "10.2 kW (max)" in result.output
    assert "2 figure(s) off" in result.output and "ttft" in result.output.split("off:")[1]


def test_calibrate_json_lists_every_figure() -> None:
    result = CliRunner().invoke(cli.app, ["calibrate", "--json"])
    rows = json.loads(result.stdout)
    assert len(rows) == len(FIGURES)
    for row in rows:
        assert {"figure", "published", "emulated", "error", "in_fit", "loo_error"} <= set(row)
    by_name = {r["figure"]: r for r in rows}
    assert by_name["decode 1 user llama-3.1-8b (16 sockets)"]["published"] == 1042
    assert by_name["switch speed-up vs DGX H100 (8 sockets)"]["in_fit"] is False


def test_calibrate_exits_one_when_a_figure_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = dict(BUILTIN_PROFILES)
    slow["sn40l-16"] = msgspec.structs.replace(slow["sn40l-16"], hbm_efficiency=0.3)
    monkeypatch.setattr(cli, "calibration_rows", lambda: calibration_rows(slow, loo=False))
    result = CliRunner().invoke(cli.app, ["calibrate"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "decode 1 user llama-3.1-8b" in result.output.split("off:")[1]
