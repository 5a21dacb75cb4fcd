"""Energy on a node (issue 19): each request's Finished carries its share, the heartbeat
the node's power and energy, the metrics a counter per model and a power gauge. Driven
on a virtual clock, so the joules are the engine's."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages
from tierflow.nodehost.beat import LoadReport, NodeIdentity, build_heartbeat
from tierflow.nodehost.driver import EngineDriver
from tierflow.nodehost.metrics import NodeMetrics
from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, BundleModel, DeploymentConfig, NodeEngine
from tierflow.rdu.energy import POWER
from tierflow.runtime.clock import VirtualClock

MODEL = "llama-3.1-8b"


async def test_finished_heartbeat_and_metrics_carry_the_engines_energy() -> None:
    clock = VirtualClock()
    bundle = [BundleModel(BUILTIN_MODELS[MODEL], DeploymentConfig.parse("ss8192-bs4"))]
    engine = NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=clock.monotonic(), preload=[MODEL])
    sent: list[messages.StreamEvent] = []

    async def publish(reply: str, data: bytes) -> None:
        sent.append(messages.stream_decoder.decode(data))

    driver = EngineDriver(engine, clock, publish, "n0")
    for i in range(3):
        request = messages.GenerateRequest(request_id=f"r{i}", model=MODEL, prompt_token_ids=[7, i, 9] * 40, max_tokens=30, ignore_eos=True)
        await driver.submit(request, f"reply.{i}")
    busy_power = None
    for _ in range(10_000):
        if not driver.in_flight:
            break
        if busy_power is None and engine.snapshot(clock.monotonic()).running:
            busy_power = engine.snapshot(clock.monotonic()).power_w
        nxt = await driver.tick()
        clock.advance(max(0.0, nxt - clock.monotonic()))
    finished = [e for e in sent if isinstance(e, messages.Finished)]
    assert len(finished) == 3 and all(f.energy_j > 0 for f in finished)

    now = clock.monotonic()
    snap = engine.snapshot(now)
    watts = POWER["sn40l-16"].node_active_w
    assert busy_power == watts
    # all the chip's work went to these three requests (no load, nothing cancelled)
    assert sum(f.energy_j for f in finished) == pytest.approx(snap.energy_joules, rel=1e-9)
    assert snap.energy_joules == pytest.approx(watts * snap.busy_seconds, rel=1e-9)

    identity = NodeIdentity(node_id="n0", role="decode", deployment="d", region="local", residency="", profile="sn40l-16")
    hb = build_heartbeat(identity, snap, LoadReport(None, None, 0, 10.0, 0, 0), seq=1, interval=1.0, sent_at=now)
    hb = messages.heartbeat_decoder.decode(messages.encoder.encode(hb))  # as the router reads it
    assert hb.energy_j == pytest.approx(snap.energy_joules) and hb.power_w == 0.0  # idle now: no idle figure

    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    metrics.set_energy("n0", snap)
    metrics.set_energy("n0", snap)  # nothing new: the counter does not move
    assert registry.get_sample_value("tierflow_node_energy_joules_total", {"node": "n0", "model": MODEL}) == pytest.approx(snap.energy_joules)
    assert registry.get_sample_value("tierflow_node_power_watts", {"node": "n0"}) == 0.0
