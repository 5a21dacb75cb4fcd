"""`tierflow emulator calibrate`: the table, and the exit code CI keys on."""

from __future__ import annotations

import msgspec
import pytest
from typer.testing import CliRunner

import tierflow.cli.emulator as cli
from tierflow.rdu import BUILTIN_PROFILES
from tierflow.rdu.calibrate import calibration_rows


def test_calibrate_prints_every_figure_and_exits_zero() -> None:
    result = CliRunner().invoke(cli.app, ["calibrate"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for model in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "deepseek-r1", "gpt-oss-120b"):
        assert model in result.output
    assert "switch speed-up" in result.output


def test_calibrate_exits_one_when_a_figure_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = dict(BUILTIN_PROFILES)
    slow["sn40l-16"] = msgspec.structs.replace(slow["sn40l-16"], hbm_efficiency=0.3)
    monkeypatch.setattr(cli, "calibration_rows", lambda: calibration_rows(slow))
    result = CliRunner().invoke(cli.app, ["calibrate"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "outside" in result.output
