"""What must hold (issue 21): a router killed and restarted mid-window neither forgets nor
double-counts any tenant's usage, and no request overshoots a quota.

`tierflow up` with one metered tenant (a token quota and a rate limit); requests through
the official `openai` client (streamed and not: the x-ratelimit-* headers on both); the
router SIGKILLed right after its last answer and restarted by `tierflow up`; more requests
until the restarted router refuses (429 insufficient_quota). Then the ledger (read from
JetStream as the admin) holds exactly one record per answered request, and its totals equal
the sum of the responses' usage, which stays within the quota.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator

import nats
import openai
import pytest
import yaml

from tierflow.harness import Fabric
from tierflow.runtime.usage_stream import read_usage

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
QUOTA = 240
LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                 "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")  # fmt: skip


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, fabric_factory: Callable[..., Fabric]) -> Iterator[Fabric]:
    root = tmp_path_factory.mktemp("usage")
    config = root / "router.yaml"
    # A window of ten years: the test never straddles two.
    config.write_text(yaml.safe_dump({"tenants": [{"name": "metered", "api_keys": ["sk-metered"], "token_quota": QUOTA,
                                                   "quota_window_s": 315_360_000, "rate_limit_rps": 50, "burst": 100}]}))  # fmt: skip
    (root / "data").mkdir()
    running = fabric_factory(root / "data", "--decode-nodes", "1", "--prefill-nodes", "0", "--actuator", "none",
                             env={"TIERFLOW_CONFIG": str(config)})  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _ask(client: openai.OpenAI, answered: dict[str, int], *, stream: bool = False) -> dict[str, str]:
    """One request of at most 8 completion tokens; its usage goes in `answered` by response id."""
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 8}
    if stream:
        raw = client.chat.completions.with_raw_response.create(**ask, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
        chunks = list(raw.parse())
        usage = chunks[-1].usage
    else:
        raw = client.chat.completions.with_raw_response.create(**ask)  # type: ignore[call-overload]
        completion = raw.parse()
        usage, chunks = completion.usage, [completion]
    assert usage is not None
    answered[chunks[0].id] = usage.prompt_tokens + usage.completion_tokens
    return dict(raw.headers)


def _serving(fabric: Fabric) -> bool:
    try:
        with urllib.request.urlopen(f"http://{fabric.host}:{fabric.http_port}/health", timeout=2) as reply:
            return json.loads(reply.read())["status"] == "ok"
    except OSError:  # not listening yet, or 503 until it hears a node
        return False


async def _ledger(fabric: Fabric) -> list[tuple[str, int, str, str]]:
    nc = await nats.connect(fabric.nats_urls, **fabric.nats_options("admin"))
    try:
        return [(r.request_id, r.prompt_tokens + r.completion_tokens, r.router, r.outcome) async for r in read_usage(nc.jetstream(), tenant="metered")]
    finally:
        await nc.close()


def test_a_router_killed_mid_window_neither_forgets_nor_double_counts_nor_overshoots(metered: Fabric) -> None:
    client = openai.OpenAI(base_url=metered.base_url, api_key="sk-metered", max_retries=0, timeout=30)
    answered: dict[str, int] = {}
    first = _ask(client, answered)
    assert all(name in first for name in LIMIT_HEADERS)
    assert first["x-ratelimit-limit-tokens"] == str(QUOTA) and first["x-ratelimit-limit-requests"] == "100"
    assert int(first["x-ratelimit-remaining-tokens"]) == QUOTA - sum(answered.values())  # settled before the answer
    # Go durations; the bucket refills one request in 20 ms, so by the time a busy box sends the answer it may be full ("0s").
    assert first["x-ratelimit-reset-tokens"].endswith("s") and re.fullmatch(r"0s|\d+ms", first["x-ratelimit-reset-requests"])
    streamed = _ask(client, answered, stream=True)  # as of its first token: its own reservation still held
    assert int(streamed["x-ratelimit-remaining-tokens"]) < QUOTA - list(answered.values())[0]
    _ask(client, answered)

    router = metered.child("router")
    os.kill(router.pid, signal.SIGKILL)  # right after the last answer: nothing flushed on purpose
    _wait(lambda: metered.child("router").restarts > router.restarts and metered.child("router").state == "running", "router restarted")
    _wait(lambda: _serving(metered), "the restarted router hearing the node")
    before_restart = dict(answered)

    refused: openai.RateLimitError | None = None
    for _ in range(QUOTA):
        try:
            _ask(client, answered)
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None, "the restarted router never refused: it forgot the usage before its restart"
    assert refused.body["code"] == "insufficient_quota" and "remain in this window" in refused.message  # type: ignore[index]
    after_restart = len(answered) - len(before_restart)
    print(f"answered {len(before_restart)} before the kill ({sum(before_restart.values())} tokens), {after_restart} after; {sum(answered.values())} of {QUOTA}")
    assert after_restart >= 1  # it served what was left ...
    assert sum(answered.values()) <= QUOTA  # ... and no more: no overshoot, across the restart

    scrape = metered.scrape_router()  # the restarted router's own books agree
    assert scrape.value("tierflow_router_usage_restored") == 1
    assert scrape.value("tierflow_router_quota_used_tokens", tenant="metered") == sum(answered.values())
    assert scrape.value("tierflow_router_quota_reserved_tokens", tenant="metered") == 0
    assert scrape.value("tierflow_router_usage_records_total", result="stored") >= after_restart
    assert scrape.value("tierflow_router_usage_records_total", result="dropped") == 0

    ledger = asyncio.run(_ledger(metered))
    ids = [request_id for request_id, _, _, _ in ledger]
    assert len(ids) == len(set(ids)), "a request recorded twice"
    assert sorted(i for i, _, _, outcome in ledger if outcome == "ok") == sorted(answered), "the ledger and the answers disagree on which requests there were"
    assert sum(tokens for _, tokens, _, _ in ledger) == sum(answered.values())
    assert {router_id for _, _, router_id, _ in ledger} == {"r0"}  # the same identity before and after
