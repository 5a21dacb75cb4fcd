"""The fault suite's short form: one fabric under load, two processes killed in turn.

The long form (`loadtest/faults.py`, README "Faults") kills every kind of process and
stops NATS; this one runs what `make test` can afford (~50 s): SIGKILL the busiest decode
node and the NATS member with the most clients (the registry writer's acknowledged
writes must survive it), each after 4 s of steady load and followed by 8 s of recovery,
against `tierflow up --nats-cluster 3 --routers 2`,
under agent sessions and a registry writer. It checks the issue's figures on every
fault: no call hung, no acknowledged registry write lost, no call failed before its first
token, every stream whose node died mid-generation completed with its exact token count
(and at least one did: the decode node's death must have caught streams in flight).
"""

from __future__ import annotations

import pytest
from faultkit.report import format_table
from faultkit.run import SuiteConfig, run_suite

pytestmark = pytest.mark.fabric


@pytest.mark.timeout(300)
def test_kill_9_under_load_loses_nothing(tmp_path) -> None:
    lines: list[str] = []
    config = SuiteConfig(faults=("decode", "nats-member"), warmup_s=4.0, steady_s=4.0, recovery_s=8.0,
                         rate_scale=2.0, hang_timeout_s=45.0, data_dir=tmp_path / "fabric")  # fmt: skip
    result = run_suite(config, say=lines.append)
    report = "\n".join(lines) + "\n" + format_table(result.rows)
    assert [r.fault for r in result.rows] == ["decode", "nats-member"], report
    decode = result.rows[0]
    assert decode.midstream >= 1, "the decode node died with no stream in flight: nothing was tested\n" + report
    for row in result.rows:
        assert row.calls > 0 and row.ok > 0, report
        assert row.hung == 0, report
        assert row.writes.get("lost", 0) == 0 and row.writes.get("acked", 0) > 0, report
        assert row.before_first == 0, report
        assert row.midstream_ok == row.midstream, report
        assert row.victim_back_s is not None, report
    assert result.hung_at_end == 0 and result.final_read_ok and not result.ledger.lost, report
