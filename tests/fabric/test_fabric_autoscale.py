"""Autoscaling the live fabric: load adds a node through the local actuator, and after the
load falls the autoscaler gives it back through cordon -> drain -> stop, with every
request served (none failed, none hung), including those on the node being drained.

`tierflow up` with one decode node of a deployment allowed 1-2 replicas, short windows
through TIERFLOW_* variables, and a 405B bundle so a few concurrent requests fill a node.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import openai
import pytest

from tierflow.contracts import messages, subjects

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-405b"
FLEET = f"""
models:
  - name: {MODEL}
    versions: [{{version: v1, catalog: {MODEL}}}]
bundles:
  - name: big
    models: [{{model: {MODEL}, config: ss8192-bs4}}]
deployments:
  - name: elastic
    bundle: big
    replicas: 1
    min_replicas: 1
    max_replicas: 2
    profile: sn40l-16
"""
ENV = {
    "TIERFLOW_INTERVAL": "0.5", "TIERFLOW_PANIC_WINDOW": "1", "TIERFLOW_STABLE_WINDOW": "6",
    "TIERFLOW_COOLDOWN_UP": "1", "TIERFLOW_COOLDOWN_DOWN": "2", "TIERFLOW_MAX_SIGNAL_AGE": "4",
    "TIERFLOW_TTFT_SLO": "5", "TIERFLOW_HEARTBEAT_INTERVAL": "0.5",
}  # fmt: skip
PROMPT = "Summarize the quarterly report. " * 150


@dataclass
class Watch:
    decisions: list[messages.AutoscalerDecision] = field(default_factory=list)
    last_beat: dict[str, float] = field(default_factory=dict)
    drained: set[str] = field(default_factory=set)  # nodes seen cordoned and draining

    def live(self, within: float = 2.0) -> set[str]:
        now = time.monotonic()
        return {n for n, t in self.last_beat.items() if now - t <= within}

    def first(self, action: str) -> messages.AutoscalerDecision | None:
        return next((d for d in self.decisions if d.deployment == "elastic" and d.action == action), None)


@dataclass
class Load:
    """Closed-loop clients; `workers` can change while it runs."""

    client: openai.AsyncOpenAI
    workers: int = 0
    max_tokens: int = 32
    ok: dict[str, int] = field(default_factory=dict)  # node -> requests served
    failed: list[str] = field(default_factory=list)
    refused: int = 0  # 429s from the router's admission: back-pressure, retried as asked
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _one(self, i: int) -> None:
        while not self.stop.is_set():
            if i >= self.workers:
                await asyncio.sleep(0.05)
                continue
            wanted = self.max_tokens
            try:
                raw = await self.client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"{PROMPT} {i}"}], max_tokens=wanted,
                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )  # fmt: skip
                tokens = 0
                async for chunk in raw.parse():
                    tokens = chunk.usage.completion_tokens if chunk.usage else tokens
                node = raw.headers.get("x-tierflow-node", "?")
                if tokens != wanted:
                    self.failed.append(f"{node}: {tokens} of {wanted} tokens")
                self.ok[node] = self.ok.get(node, 0) + 1
            except openai.RateLimitError as exc:  # over the router's admission limit: come back when told
                self.refused += 1
                await asyncio.sleep(float(exc.response.headers.get("retry-after", "1")))
            except Exception as exc:  # every failure is a test failure, reported below
                self.failed.append(f"{type(exc).__name__}: {exc}")

    def run(self, n: int) -> asyncio.Future[list[None]]:
        return asyncio.gather(*(self._one(i) for i in range(n)))


async def _until(predicate, timeout: float, what: str, load: Load) -> None:
    """Wait for `predicate`; the timeouts are generous because a loaded 2-core CI box may
    take several times the usual few seconds (they cost nothing when things go well)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert not load.failed, load.failed
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_load_adds_a_node_and_its_end_gives_it_back_without_losing_a_request(tmp_path: Path, fabric_factory) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    (tmp_path / "data").mkdir()
    fabric = await asyncio.to_thread(
        fabric_factory, tmp_path / "data", "--fleet", str(fleet), "--deployment", "elastic", "--decode-nodes", "1", "--prefill-nodes", "0", env=ENV
    )  # fmt: skip
    nc = await nats.connect(fabric.nats_urls, **fabric.nats_options())
    watch = Watch()

    async def on_decision(msg) -> None:
        watch.decisions.append(messages.decision_decoder.decode(msg.data))

    async def on_beat(msg) -> None:
        hb = messages.heartbeat_decoder.decode(msg.data)
        watch.last_beat[hb.node_id] = time.monotonic()
        if hb.cordoned and hb.draining:
            watch.drained.add(hb.node_id)

    await nc.subscribe(subjects.AUTOSCALER_DECISIONS, cb=on_decision)
    await nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_beat)
    client = openai.AsyncOpenAI(base_url=fabric.base_url, api_key="k", max_retries=0, timeout=60)
    load = Load(client)
    runner = load.run(10)
    try:
        # 1. A full node and a queue: the autoscaler asks the supervisor for a second node.
        load.workers = 10
        await _until(lambda: watch.first("up") is not None, 45, "a scale-up decision", load)
        up = watch.first("up")
        assert (up.current_replicas, up.desired_replicas, up.actuator) == (1, 2, "local"), up
        assert up.signal in ("utilization", "queue", "ttft") and up.reason
        await _until(lambda: load.ok.get("decode-1", 0) >= 3, 60, "the new node decode-1 serving", load)

        # 2. Light, long requests: below target, so after the stable window one node goes;
        #    it is cordoned, drains what it runs, and only then is stopped.
        load.workers, load.max_tokens = 2, 240
        await _until(lambda: watch.first("down") is not None, 60, "a scale-down decision", load)
        down = watch.first("down")
        assert (down.current_replicas, down.desired_replicas) == (2, 1) and len(down.victims) == 1, down
        victim = down.victims[0]
        await _until(lambda: victim not in watch.live(within=1.5), 45, f"{victim} to stop", load)
        assert victim in watch.drained  # it said it was draining before it went quiet
        await asyncio.sleep(2.0)  # requests placed around the cordon finish elsewhere
    finally:
        load.stop.set()
        await runner
        await client.close()
        await nc.drain()
        fabric.stop()

    assert load.failed == [], load.failed
    assert sum(load.ok.values()) > 20
    assert watch.live(within=10) - {victim} == {"decode-0", "decode-1"} - {victim}
    log = fabric.log("autoscaler")
    assert f"removed {victim}" in log and "started decode-1" in log
    up_out = (tmp_path / "data" / "up.out").read_text()
    assert "exited" not in up_out and "was killed" not in up_out, up_out  # the stop was asked for, not a crash
