"""The front-door benchmark's parts on real input (loadtest/frontdoor.py, issue 16).

The zero backend must be a real OpenAI server as far as the official client can tell
(else the benchmark would time something clients cannot use), and the figures come from
parsing wrk's report and /proc: both are checked against a live wrk run and live
processes, not only canned text. No timed assertions: only that figures exist and agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))

from frontdoor.procstat import CpuWindow, cpu_seconds, descendants, find_pids, read_stat
from frontdoor.report import Run, checks, format_table, summarize
from frontdoor.targets import Target, check_answers, start_backend, start_floor
from frontdoor.wrk import WRK, WrkResult, lua_script, parse_duration, parse_wrk, run_wrk


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    target = start_backend(tmp_path_factory.mktemp("frontdoor"))
    yield target
    target.stop()


def _client(backend: Target) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=backend.url.removesuffix("/chat/completions"),
        api_key="unused",
        max_retries=0,
    )


def test_backend_answers_a_chat_completion(backend: Target) -> None:
    reply = _client(backend).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "m"
    assert (
        choice.message.role == "assistant"
        and choice.message.content == " hi hi hi"
        and choice.finish_reason == "length"
    )
    assert (
        reply.usage is not None
        and reply.usage.completion_tokens == 3
        and reply.usage.prompt_tokens == 1
    )


def test_backend_streams_one_token_per_chunk_and_usage(backend: Target) -> None:
    stream = _client(backend).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [
        c.choices[0].delta.content
        for c in chunks
        if c.choices and c.choices[0].delta.content
    ]
    assert deltas == [" hi"] * 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == 5
    )
    assert len({c.id for c in chunks}) == 1


def test_backend_refuses_what_is_not_a_chat_request(backend: Target) -> None:
    with pytest.raises(openai.NotFoundError):
        _client(backend).completions.create(model="m", prompt="hi")
    assert "400" in check_answers(
        backend.url, b'{"model": 1}', stream=False
    )  # not a chat request: 400, and the check says so
    body = json.dumps(
        {"model": "m", "messages": [], "max_tokens": 2, "stream": True}
    ).encode()
    assert check_answers(backend.url, body, stream=True) == ""


WRK_REPORT = """Running 1s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.01ms  450.00us  12.50ms   90.00%
    Req/Sec    30.00k     1.00k   31.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.01s
  30000 requests in 1.00s, 9.00MB read
  Non-2xx or 3xx responses: 7
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  29990.00
Transfer/sec:      9.00MB
FRONTDOOR responses=30000 complete=29993 tokens=1919552 failed=7
"""


def test_parse_wrk_reads_every_figure() -> None:
    r = parse_wrk(WRK_REPORT)
    assert (r.requests, r.seconds, r.rps) == (30000, 1.0, 29990.0)
    assert (r.p50, r.p90, r.p99) == (
        pytest.approx(850e-6),
        pytest.approx(1.5e-3),
        pytest.approx(2.01),
    )
    assert (r.non2xx, r.socket_errors) == (7, 3) and not r.ok
    assert r.counts == {
        "responses": 30000,
        "complete": 29993,
        "tokens": 1919552,
        "failed": 7,
    }
    assert parse_duration("1.5m") == 90.0
    with pytest.raises(ValueError):
        parse_wrk("wrk: connection refused")


def test_proc_accounting_sees_a_busy_child_and_not_its_idle_sibling() -> None:
    code = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    busy = subprocess.Popen([sys.executable, "-c", code])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stat = read_stat(busy.pid)
        assert (
            stat is not None
            and stat.ppid == os.getpid()
            and stat.comm.startswith("python")
        )
        assert busy.pid in descendants(os.getpid()) and idle.pid in descendants(
            os.getpid()
        )
        assert busy.pid not in descendants(os.getpid(), stop=frozenset({busy.pid}))
        assert busy.pid in find_pids("time.process_time() + 0.3")
        window = CpuWindow({"busy": [busy.pid], "idle": [idle.pid]})
        window.start()
        while cpu_seconds(busy.pid) < 0.3:  # the child burns 0.3 s of CPU, then sleeps
            time.sleep(0.02)
        seconds = window.stop()
        assert seconds["busy"] >= 0.2 and seconds["idle"] < 0.05
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
    assert read_stat(busy.pid) is None and cpu_seconds(busy.pid) == 0.0


@pytest.mark.skipif(
    not Path(WRK).exists(), reason=f"wrk not installed at {WRK} (apt-get install wrk)"
)
def test_wrk_against_the_backend_yields_figures_and_cpu(backend: Target) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    window = CpuWindow(backend.groups)
    plain = run_wrk(
        backend.url,
        lua_script(json.dumps(body)),
        seconds=1,
        connections=4,
        on_start=window.start,
        on_stop=window.stop,
    )
    assert (
        plain.ok
        and plain.requests > 0
        and 0 < plain.p50 <= plain.p99
        and plain.counts == {}
    )
    assert window.seconds["backend"] > 0 and plain.wrk_cpu > 0
    stream_body = body | {
        "max_tokens": 8,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    streamed = run_wrk(
        backend.url,
        lua_script(json.dumps(stream_body), count_stream=True),
        seconds=1,
        connections=4,
    )
    assert streamed.ok and streamed.counts["failed"] == 0
    assert (
        streamed.counts["complete"]
        == streamed.counts["responses"]
        >= streamed.requests
        > 0
    )
    assert streamed.counts["tokens"] == 8 * streamed.counts["complete"]
    # the report over these runs: one row per path, the issue's checks n/a without a fabric
    runs = [
        Run("chat c=32", "direct", 0, plain, window.seconds),
        Run("stream64 c=32", "direct", 0, streamed, {"backend": 0.0}),
    ]
    summaries = summarize(runs)
    assert summaries[("stream64 c=32", "direct")].tokens_per_s > 0
    table = format_table(summaries, ["chat c=32", "stream64 c=32"])
    assert table.count("| direct |") == 2 and "backend" in table
    assert checks(summaries, "chat c=32", "chat c=1", "stream64 c=32")[0].holds is None


def test_checks_name_the_issue_bounds() -> None:
    def run(
        scenario: str,
        target: str,
        rps: float,
        p50: float,
        p99: float,
        cpu: dict[str, float],
        tokens: int = 0,
    ) -> Run:
        counts = (
            {"responses": int(rps), "complete": int(rps), "tokens": tokens}
            if tokens
            else {}
        )
        return Run(
            scenario,
            target,
            0,
            WrkResult(int(rps), 1.0, rps, p50, p99, p99, counts=counts),
            cpu,
        )

    runs = [run("a", "vllm-router", 1000, 1e-3, 10e-3, {"vllm-router": 0.15}), run("a", "fabric", 1400, 1e-3, 9e-3, {"router": 0.1}),
            run("b", "direct", 100, 0.2e-3, 1e-3, {}), run("b", "fabric", 100, 1.5e-3, 3e-3, {"router": 0.01}),
            run("c", "fabric", 100, 1e-3, 1e-3, {"router": 0.0256}, tokens=6400)]  # fmt: skip
    found = {c.what: c.holds for c in checks(summarize(runs), "a", "b", "c")}
    assert found == {
        "a: fabric req/s / vllm-router req/s": True,  # 1.4x
        "a: fabric p99 / vllm-router p99": True,
        "a: tierflow router CPU per request": True,  # 71 µs
        "b: fabric p50 added over direct": False,  # 1.3 ms
        "c: tierflow router CPU per token": True,  # 4 µs
    }


def test_floor_carries_both_shapes_over_nats(tmp_path) -> None:
    """The floor path (HTTP -> NATS -> bare responder) answers what the backend answers,
    so its req/s is comparable: a chat completion and a whole SSE stream."""
    floor = start_floor(tmp_path)
    try:
        assert set(floor.groups) == {"router", "decode-node", "nats-server"}
        client = _client(floor)
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.choices[0].message.content == " hi hi"
        chunks = list(
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=3,
                stream=True,
            )
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            == " hi hi hi"
        )
    finally:
        floor.stop()
