"""The fault suite's judging parts, on data made up to exercise each rule (no fabric).

If these break, the suite's tables lie: a stream that lost a token counted ok, a lost
registry write missed, a failure blamed on the wrong fault, a growing series called flat.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web
from faultkit.catalog import FAULTS, ConnectionProbe, Injection
from faultkit.ledger import Ledger, Write
from faultkit.load import CallRecord, TokenBins, make_client, stream_call
from faultkit.report import Expected, Window, build_row, throughput_back, watch_latency
from faultkit.routerlog import RouterRecord, read_router_records, watch_resumed
from soak import Samples, judge

from tierflow.tokenizer import OUTPUT_VOCAB

# ---------------------------------------------------------------- the client's checks


def _chunk(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"


def _usage(n: int) -> bytes:
    return b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}}).encode() + b"\n\n"


@pytest.fixture
async def sse_server(unused_tcp_port: int):
    """An OpenAI-shaped endpoint whose streams misbehave on demand (the request's model says how)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode, n = body["model"], body["max_tokens"]
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": f"req-{mode}"})
        if mode == "refuse":
            return web.json_response({"error": {"message": "busy", "type": "overloaded", "code": "overloaded"}}, status=429, headers={"retry-after": "1"})
        await response.prepare(request)
        words = [OUTPUT_VOCAB[i % len(OUTPUT_VOCAB)] for i in range(n)]
        if mode == "short":
            words = words[:-1]  # a token lost on the way, usage still claims them all
        for word in words[: n // 2] if mode in ("error", "trickle") else words:
            await response.write(_chunk(word))
        if mode == "error":
            await response.write(b'data: {"error": {"message": "node died", "type": "server_error", "code": "node_lost"}}\n\n')
            return response
        if mode == "trickle":
            for _ in range(100):
                await response.write(b": keep-alive\n\n")
                await asyncio.sleep(0.05)
        await response.write(_usage(n))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    yield f"http://127.0.0.1:{unused_tcp_port}/v1"
    await runner.cleanup()


async def _call(base_url: str, mode: str, *, hang: float = 10.0) -> CallRecord:
    client, pool = make_client(base_url, connections=4, timeout=hang)
    record = CallRecord(key=mode, source="test", model=mode, max_tokens=8, sent=0.0)
    try:
        await stream_call(client, record, [{"role": "user", "content": "hi"}], hang_timeout=hang, bins=TokenBins())
    finally:
        await pool.aclose()
    return record


async def test_an_exact_stream_is_ok_and_a_short_one_is_not(sse_server: str) -> None:
    ok = await _call(sse_server, "exact")
    assert (ok.outcome, ok.text_tokens, ok.usage_tokens, ok.request_id) == ("ok", 8, 8, "req-exact")
    short = await _call(sse_server, "short")
    assert short.outcome == "wrong_count" and short.error == "count 7/8 of 8"


async def test_an_error_event_after_tokens_is_a_failure_with_its_first_token(sse_server: str) -> None:
    record = await _call(sse_server, "error")
    assert record.outcome == "failed" and record.error == "sse node_lost" and record.had_first_token


async def test_a_refusal_keeps_its_status_and_retry_after(sse_server: str) -> None:
    record = await _call(sse_server, "refuse")
    assert (record.outcome, record.status, record.retry_after, record.had_first_token) == ("failed", 429, "1", False)


async def test_keep_alives_do_not_keep_a_call_from_hanging(sse_server: str) -> None:
    record = await _call(sse_server, "trickle", hang=1.0)
    assert record.outcome == "hung" and record.had_first_token


# ---------------------------------------------------------------- the registry writer


class _Stub:
    def __init__(self, held: int) -> None:
        self.held = held

    async def GetModel(self, request, timeout):  # noqa: N802 - the gRPC method's name
        class Model:
            traffic = [type("W", (), {"version": "v1", "weight": float(self.held)})()]

        return Model()


async def test_a_read_below_an_acknowledged_write_loses_it_and_the_ones_between() -> None:
    ledger = Ledger("unused")
    for seq in range(1, 6):
        ledger.writes.append(Write(seq, float(seq), acked=float(seq) + 0.1 if seq != 4 else None, error="" if seq != 4 else "UNAVAILABLE"))
    ledger._acked_max = 5
    assert await ledger.check(_Stub(held=5)) and not ledger.lost
    assert await ledger.check(_Stub(held=6)) and not ledger.lost  # a timed-out write that landed: fine
    assert await ledger.check(_Stub(held=2))
    assert ledger.lost == {3, 5}  # 4 was never acknowledged
    assert ledger.summary(0, 10) == {"sent": 5, "acked": 4, "lost": 2, "failed UNAVAILABLE": 1}


# ---------------------------------------------------------------- one row per fault


def _call_record(key: str, sent: float, *, first: float | None = 0.2, end: float = 3.0, outcome: str = "ok", error: str = "", rid: str = "") -> CallRecord:
    return CallRecord(key=key, source="session", model="planner", max_tokens=30, sent=sent, first=None if first is None else sent + first,
                      done=sent + end, outcome=outcome, error=error, request_id=rid or key)  # fmt: skip


def test_a_row_sorts_calls_by_what_happened_to_them() -> None:
    calls = [
        _call_record("plain", 10),
        _call_record("migrated", 11),
        _call_record("retried", 12),
        _call_record("broke", 13, outcome="failed", error="sse node_lost"),
        _call_record("refused", 14, first=None, end=0.01, outcome="failed", error="http 502 no_healthy_node"),
        _call_record("late", 5, end=30.0),  # sent before the window, ended in it
        _call_record("next", 28, end=10.0),  # sent in the window, ended after it: the next fault's
    ]
    routers = {
        "migrated": RouterRecord(ts=14, request_id="migrated", attempts=2, migrations=1),
        "retried": RouterRecord(ts=15, request_id="retried", attempts=2),
    }
    window = Window(FAULTS["decode"], 8.0, 15.0, 36.0, Injection("decode-0", "SIGKILL", 15.0, 2.0))
    ledger = Ledger("unused", writes=[Write(1, 9.0, acked=9.1)])
    row = build_row(window, calls, routers, ledger, TokenBins(), Expected(calls))
    assert (row.calls, row.ok, row.failed, row.before_first, row.midstream, row.midstream_ok, row.migrated, row.retried) == (6, 4, 2, 1, 2, 1, 1, 1)
    assert row.why == {"sse node_lost": 1, "http 502 no_healthy_node": 1}
    assert dict(row.musts) == {"0 hung": True, "0 registry writes lost": True, "0 failures before the first token": False,
                               ">= 99% of mid-stream deaths complete, exact token count": False}  # fmt: skip


def test_a_killed_routers_own_connections_are_not_counted_against_the_fabric() -> None:
    calls = [_call_record("a", 10, outcome="failed", error="connection RemoteProtocolError"),
             _call_record("b", 10, first=None, outcome="failed", error="connection ConnectError")]  # fmt: skip
    window = Window(FAULTS["router"], 8.0, 15.0, 36.0, Injection("router-0", "SIGKILL", 15.0, 2.0))
    row = build_row(window, calls, {}, Ledger("unused"), TokenBins(), Expected(calls))
    assert (row.router_conns, row.before_first, row.midstream) == (2, 0, 0) and row.passed
    other = build_row(Window(FAULTS["decode"], 8.0, 15.0, 36.0, Injection("decode-0", "SIGKILL", 15.0, 2.0)), calls, {}, Ledger("unused"), TokenBins(), Expected(calls))
    assert (other.router_conns, other.before_first, other.midstream) == (0, 1, 1) and not other.passed


def _steady_load(dip: tuple[int, int] | None = None) -> tuple[list[CallRecord], TokenBins]:
    """One 10-token call sent every 0.25 s, delivering 10 tokens/s for 1 s after 0.5 s;
    during `dip` (seconds) nothing is delivered."""
    calls, bins = [], TokenBins()
    for k in range(400):
        sent = 1000.0 + k * 0.25
        calls.append(CallRecord(key=str(k), source="session", model="m", max_tokens=10, sent=sent, first=sent + 0.5, done=sent + 1.4))
        for i in range(10):
            at = sent + 0.5 + i * 0.1
            if dip is None or not dip[0] <= at - 1000 < dip[1]:
                bins.add(at, 1)
    return calls, bins


def test_throughput_is_back_when_delivery_catches_up_with_what_was_asked() -> None:
    calls, bins = _steady_load()
    level, back = throughput_back(bins, Expected(calls), 1010.0, 1030.0, 1090.0)
    assert level == pytest.approx(1.0, abs=0.05) and back == 0.0
    calls, bins = _steady_load(dip=(30, 40))
    level, back = throughput_back(bins, Expected(calls), 1010.0, 1030.0, 1090.0)
    assert back is not None and 10.0 <= back <= 13.0
    calls, bins = _steady_load(dip=(30, 100))
    assert throughput_back(bins, Expected(calls), 1010.0, 1030.0, 1090.0)[1] is None
    calls, bins = _steady_load(dip=(60, 63))  # a dip half a minute later is not the fault's
    assert throughput_back(bins, Expected(calls), 1010.0, 1030.0, 1090.0)[1] == 0.0


def test_the_watch_is_timed_per_router_from_its_first_new_answer() -> None:
    injection = Injection("nats", "SIGSTOP 5s", 100.0, change_acked=101.0, probes=[
        ConnectionProbe([(100.9, 8192), (101.1, 8192), (101.3, 16384)], "a"),
        ConnectionProbe([(101.0, 8192), (101.2, 16384)], "b"),  # the same router, sooner
        ConnectionProbe([(101.0, 8192), (102.5, 16384)], "c"),
        ConnectionProbe([(101.0, 8192), (101.1, 8192)], "d"),  # never: router-2 missed the change
        ConnectionProbe([(101.0, 8192)], ""),  # broke before it was named
    ])  # fmt: skip
    routers = {rid: RouterRecord(ts=0, request_id=rid, service=svc) for rid, svc in (("a", "router-0"), ("b", "router-0"), ("c", "router-1"), ("d", "router-2"))}
    assert watch_latency(injection, routers, 16384) == {"router-0": pytest.approx(0.2), "router-1": pytest.approx(1.5), "router-2": None}


# ---------------------------------------------------------------- logs and the soak


def test_router_logs_are_read_past_a_line_cut_by_sigkill(tmp_path: Path) -> None:
    good = {"ts": 5.0, "msg": "request", "request_id": "r1", "migrations": 1, "attempts": 2, "outcome": "ok", "status": 200}
    watch = {"ts": 12.5, "msg": "watch of tierflow-registry/> resumed after 2.0s (3 failed attempts)"}
    (tmp_path / "router-0.log").write_text(json.dumps(good) + "\n" + json.dumps(watch) + '\n{"ts": 6.0, "msg": "request", "request_')
    (tmp_path / "router-1.log").write_text("")
    records = read_router_records(tmp_path)
    assert list(records) == ["r1"] and records["r1"].service == "router-0" and records["r1"].migrations == 1
    assert watch_resumed(tmp_path, since=10.0, resumed=12.0) == {"router-0": 0.5, "router-1": "not down"}


def test_the_soak_calls_a_leak_a_leak_and_noise_flat() -> None:
    samples = Samples(t0=0.0)
    for i in range(60):
        samples.series.setdefault(("rss_mib", "leaky"), []).append((i * 30.0, 80.0 + 0.5 * i))
        samples.series.setdefault(("rss_mib", "steady"), []).append((i * 30.0, 80.0 + (3.0 if i % 2 else -3.0)))
        samples.series.setdefault(("open_files", "warming"), []).append((i * 30.0, 20.0 + min(i, 5)))
        # a router's client connections: +-25 around 50, drifting 6 over the run by chance
        samples.series.setdefault(("open_files", "noisy"), []).append((i * 30.0, 50.0 + (25.0 if i % 3 else -25.0) + 0.1 * i))
        samples.series.setdefault(("prefix_blocks", "decode-0"), []).append((i * 30.0, 1000.0 * i))  # a cache may grow
    verdicts = {v.who: v for v in judge(samples, warm_up_share=0.2)}
    assert not verdicts["leaky"].flat and verdicts["steady"].flat and verdicts["warming"].flat
    assert verdicts["noisy"].rise > verdicts["noisy"].tolerance and verdicts["noisy"].flat
    assert "decode-0" not in verdicts
