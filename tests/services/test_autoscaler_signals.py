"""The latency a node reports in its heartbeat: what the autoscaler's SLO signals read.

A real emulated engine under the real driver (wall clock, in-process); no NATS needed:
the driver publishes through a function.
"""

from __future__ import annotations

import asyncio

import msgspec

from tierflow.contracts import messages
from tierflow.nodehost.driver import EngineDriver
from tierflow.nodehost.heartbeat import NodeIdentity, heartbeat_message
from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, BundleModel, DeploymentConfig, NodeEngine
from tierflow.runtime.clock import WallClock


def _engine(clock: WallClock) -> NodeEngine:
    bundle = [BundleModel(BUILTIN_MODELS["llama-3.1-8b"], DeploymentConfig.parse("ss8192-bs4"))]
    return NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=clock.monotonic(), preload=["llama-3.1-8b"])


async def test_heartbeat_carries_p95_ttft_itl_in_flight_and_queued_prompt_tokens() -> None:
    clock = WallClock()
    engine = _engine(clock)
    sent: list[tuple[str, bytes]] = []

    async def publish(subject: str, data: bytes) -> None:
        sent.append((subject, data))

    driver = EngineDriver(engine, clock, publish, "n0", latency_window=30.0)
    identity = NodeIdentity(node_id="n0", role="decode", deployment="d", region="local", residency="", profile="sn40l-16")

    idle = heartbeat_message(identity, driver, clock, 1, 1.0)
    assert (idle.ttft_p95, idle.itl_p95, idle.latency_samples, idle.in_flight) == (None, None, 0, 0)

    for i in range(6):  # more than the batch of 4: two wait with their prompts queued
        request = messages.GenerateRequest(request_id=f"r{i}", model="llama-3.1-8b", prompt_token_ids=list(range(300)), max_tokens=24, ignore_eos=True)
        await driver.submit(request, f"reply.{i}")
    queued = heartbeat_message(identity, driver, clock, 2, 1.0)
    assert queued.in_flight == 6 and queued.queued_prompt_tokens == 6 * 300

    stop = asyncio.Event()
    runner = asyncio.create_task(driver.run(stop))
    async with asyncio.timeout(10):
        while driver.in_flight:
            await asyncio.sleep(0.01)
    stop.set()
    await runner

    beat = heartbeat_message(identity, driver, clock, 3, 1.0)
    assert beat.latency_samples == 6 and beat.latency_window_s == 30.0
    assert beat.ttft_p95 is not None and beat.itl_p95 is not None
    assert 0 < beat.itl_p95 < beat.ttft_p95 < 5  # the queued two waited for a whole batch
    assert beat.in_flight == 0 and beat.queued_prompt_tokens == 0
    # what the router and autoscaler decode, with its non-negative limits, round-trips
    assert msgspec.json.decode(messages.encoder.encode(beat), type=messages.NodeHeartbeat) == beat


def test_old_heartbeats_without_the_new_fields_still_decode() -> None:
    old = b'{"v":1,"node_id":"n1","running":2,"queue_depth":1,"max_batch":8}'
    hb = messages.heartbeat_decoder.decode(old)
    assert hb.ttft_p95 is None and hb.itl_p95 is None and hb.in_flight == 0
