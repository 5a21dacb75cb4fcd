"""The usage ledger on a real JetStream: records stored once (a retried batch is deduplicated
by its message id, a request noted twice is read once), publishes retried until the stream takes them, a full buffer counted and
logged, the stream made idempotently, quotas rebuilt from it, and `tierflow usage`
summing it (the CLI run as a user runs it)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from tierflow.contracts import subjects
from tierflow.contracts.usage import UsageRecord, batch_decoder
from tierflow.placement import TenantDirectory
from tierflow.runtime.clock import WallClock
from tierflow.runtime.usage_stream import ensure_usage_stream, read_usage, summarize
from tierflow.services.router.dispatch import RequestRecord
from tierflow.services.router.usage_ledger import UsageLedger, _Batch, _Generation, restore_usage


def _record(request_id: str, tenant: str, *, prompt: int = 10, completion: int = 5, model: str = "m", outcome: str = "ok") -> RequestRecord:
    record = RequestRecord(request_id=request_id, api="chat", model=model, version="v1", tenant=tenant, prompt_tokens=prompt,
                           completion_tokens=completion, prefix_hit_tokens=4, finish_reason="stop" if outcome == "ok" else "", energy_j=2.5)  # fmt: skip
    record.admitted_at = WallClock().now()
    if outcome == "cancelled":
        record.cancelled()
    return record


async def _stored(js, tenant: str) -> list[UsageRecord]:  # type: ignore[no-untyped-def]
    return [rec async for rec in read_usage(js, tenant=tenant, wait=2.0)]


async def test_records_are_stored_once_retried_until_the_stream_exists_and_read_back(private_nats_url: str) -> None:
    nc = await nats.connect(private_nats_url)
    js = nc.jetstream()
    stopping = asyncio.Event()
    ledger = UsageLedger(js, "r1", WallClock(), ack_wait=0.2)
    task = asyncio.create_task(ledger.run(stopping))
    try:
        first = ledger.note(_record("req-a", "acme.eu"))  # no stream yet: the publish fails and is retried
        assert first is not None
        await first  # the answer's wait runs out (bounded) ...
        assert ledger.buffered == 1 and ledger._failed._value.get() >= 1 and ledger._late._value.get() == 1  # type: ignore[attr-defined]
        await ensure_usage_stream(js, max_age=3600, replicas=3)  # one server: one copy
        await ensure_usage_stream(js, max_age=3600, replicas=3)  # again: nothing to change
        info = await js.stream_info(subjects.USAGE_STREAM)
        assert info.config.num_replicas == 1 and info.config.max_age == 3600 and info.config.deny_purge
        assert ledger.note(_record("req-b", "acme.eu", prompt=7, completion=0, outcome="cancelled")) is None  # nobody waits for it
        again = ledger.note(_record("req-a", "acme.eu"))  # the same request noted again: read once
        assert again is not None
        await asyncio.wait_for(again, 5)  # returns once acknowledged
        await ledger.flush(10)
        assert ledger.buffered == 0
        # The failed batch [req-a] retried whole, then one batch [req-b, req-a]: records stored.
        assert ledger._stored._value.get() == 3 and ledger._duplicate._value.get() == 0  # type: ignore[attr-defined]
        # A batch published again (its acknowledgement was lost) is stored once: the same message id.
        resent = _Batch([UsageRecord(request_id="req-c", tenant="acme.eu", model="m", outcome="ok", status=200, router="r1", admitted_at=1.0, at=1.0)],
                        subjects.usage("acme.eu", "r1"), "r1:req-c", _Generation(asyncio.get_running_loop().create_future()))  # fmt: skip
        assert await ledger._publish(resent) and await ledger._publish(resent)
        assert ledger._duplicate._value.get() == 1  # type: ignore[attr-defined]
        stored = [r for r in await _stored(js, "acme.eu") if r.request_id != "req-c"]
        assert sorted(r.request_id for r in stored) == ["req-a", "req-b"]
        a = next(r for r in stored if r.request_id == "req-a")
        assert (a.tenant, a.router, a.prompt_tokens, a.cached_tokens, a.completion_tokens, a.energy_j, a.outcome) == ("acme.eu", "r1", 10, 4, 5, 2.5, "ok")
        b = next(r for r in stored if r.request_id == "req-b")
        assert (b.outcome, b.status, b.prompt_tokens, b.completion_tokens, b.energy_j) == ("cancelled", 499, 0, 0, None)  # no output: nothing charged
        msg = await js.get_last_msg(subjects.USAGE_STREAM, subjects.usage("acme.eu", "r1"))
        assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == "r1:req-c"
        batch = batch_decoder.decode(msg.data)
        assert isinstance(batch, list) and [r.request_id for r in batch] == ["req-c"]
    finally:
        stopping.set()
        await task
        await ledger.close()
        await nc.close()


async def test_a_full_buffer_drops_the_record_counts_and_logs_it(private_nats_url: str, caplog: pytest.LogCaptureFixture) -> None:
    nc = await nats.connect(private_nats_url)
    ledger = UsageLedger(nc.jetstream(), "r1", WallClock(), capacity=2, ack_wait=0)
    with caplog.at_level(logging.WARNING, logger="tierflow.services.router.usage_ledger"):
        for i in range(3):
            ledger.note(_record(f"full-{i}", "full"))
    assert ledger.buffered == 2 and ledger._dropped._value.get() == 1  # type: ignore[attr-defined]
    dropped = [r for r in caplog.records if "usage record dropped" in r.getMessage()]
    assert len(dropped) == 1 and '"request_id":"full-2"' in dropped[0].fields["usage_record"]  # type: ignore[attr-defined]
    await ensure_usage_stream(nc.jetstream(), max_age=3600)
    await ledger.close()  # at shutdown: the rest is stored
    assert sorted(r.request_id for r in await _stored(nc.jetstream(), "full")) == ["full-0", "full-1"]
    await nc.close()


async def test_a_restarted_router_rebuilds_its_quota_from_the_stream(private_nats_url: str) -> None:
    nc = await nats.connect(private_nats_url)
    js = nc.jetstream()
    await ensure_usage_stream(js, max_age=3600)
    clock = WallClock()
    stopping = asyncio.Event()
    ledger = UsageLedger(js, "r7", clock, ack_wait=0)
    task = asyncio.create_task(ledger.run(stopping))
    for i in range(5):
        ledger.note(_record(f"q-{i}", "quota-co", prompt=100, completion=50))
    await ledger.flush(10)
    stopping.set()
    await task
    directory = TenantDirectory.from_config({"tenants": [{"name": "quota-co", "api_keys": ["k"], "token_quota": 1000, "quota_window_s": 86400}]})
    directory.expect_restore()
    assert await restore_usage(js, directory, "r7", clock, started_at=clock.now()) >= 5
    quota = directory.tenants["quota-co"].quota
    assert quota is not None and quota.ready and quota.used(clock.now()) == 750 and quota.remaining(clock.now()) == 250
    await nc.close()


async def test_tierflow_usage_sums_the_stream_by_tenant_model_and_day(private_nats_url: str, tmp_path: Path) -> None:
    nc = await nats.connect(private_nats_url)
    js = nc.jetstream()
    await ensure_usage_stream(js, max_age=3600)
    stopping = asyncio.Event()
    ledger = UsageLedger(js, "r2", WallClock(), ack_wait=0)
    task = asyncio.create_task(ledger.run(stopping))
    for i, (tenant, model, prompt, completion) in enumerate([("cli-a", "m1", 10, 5), ("cli-a", "m1", 20, 7), ("cli-a", "m2", 3, 3), ("cli-b", "m1", 100, 1)]):
        ledger.note(_record(f"cli-{i}", tenant, prompt=prompt, completion=completion, model=model))
    await ledger.flush(10)
    stopping.set()
    await task
    await nc.close()

    env = {**os.environ, "TIERFLOW_DATA_DIR": str(tmp_path), "TIERFLOW_NATS_CREDS": ""}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tierflow", "usage", "--nats-url", private_nats_url, *args],
                              capture_output=True, text=True, timeout=60, env=env)  # fmt: skip

    done = cli("--since", "1h", "--by", "tenant,model,day", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    rows = {(r["key"]["tenant"], r["key"]["model"]): r for r in doc["rows"] if r["key"]["tenant"].startswith("cli-")}
    assert {k: (r["requests"], r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) for k, r in rows.items()} == {
        ("cli-a", "m1"): (2, 30, 12, 42), ("cli-a", "m2"): (1, 3, 3, 6), ("cli-b", "m1"): (1, 100, 1, 101)}
    assert all(len(r["key"]["day"]) == 10 for r in rows.values())
    table = cli("--since", "1h", "--tenant", "cli-a")
    assert table.returncode == 0, table.stderr
    assert "cli-a" in table.stdout and "cli-b" not in table.stdout and "48" in table.stdout  # the tenant's total tokens
    assert cli("--by", "colour").returncode == 2  # a bad grouping is named
    # The same sums as the library's, from the records themselves.
    nc = await nats.connect(private_nats_url)
    mine = [r async for r in read_usage(nc.jetstream(), since=None) if r.tenant.startswith("cli-")]
    await nc.close()
    assert [(r.key, r.total_tokens) for r in summarize(mine, ["tenant"])] == [({"tenant": "cli-a"}, 48), ({"tenant": "cli-b"}, 101)]
