"""A GenerateRequest's class, tenant and weight reach the engine through the driver, and
the node's metrics show the queue per class and the preemptions. Driven on a virtual
clock, as test_node_energy."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tierflow.contracts import messages
from tierflow.nodehost.driver import EngineDriver
from tierflow.nodehost.metrics import NodeMetrics
from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, BundleModel, DeploymentConfig, NodeEngine
from tierflow.runtime.clock import VirtualClock

MODEL = "llama-3.1-8b"


async def test_an_interactive_request_overtakes_queued_batch_work_and_metrics_say_so() -> None:
    clock = VirtualClock()
    bundle = [BundleModel(BUILTIN_MODELS[MODEL], DeploymentConfig.parse("ss8192-bs4"))]
    engine = NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=clock.monotonic(), preload=[MODEL])
    sent: list[messages.StreamEvent] = []

    async def publish(reply: str, data: bytes) -> None:
        sent.append(messages.stream_decoder.decode(data))

    driver = EngineDriver(engine, clock, publish, "n0")

    def ask(rid: str, cls: str, tenant: str, max_tokens: int, weight: float = 1.0) -> messages.GenerateRequest:
        return messages.GenerateRequest(
            request_id=rid, model=MODEL, prompt_token_ids=[7, len(rid), 9] * 60, max_tokens=max_tokens, ignore_eos=True,
            tenant=tenant, request_class=cls, tenant_weight=weight,  # type: ignore[arg-type]
        )  # fmt: skip

    async def run_until(t: float) -> None:
        while clock.monotonic() < t:
            nxt = await driver.tick()
            clock.advance(max(0.0, min(nxt, t) - clock.monotonic()))

    for i in range(8):  # four fill the batch, four wait
        await driver.submit(ask(f"b{i}", "batch", "bulk", 3000), f"reply.b{i}")
    await run_until(0.5)
    await driver.submit(ask("i", "interactive", "chat", 20, weight=2.0), "reply.i")
    queued = engine._requests["i"]
    assert (queued.rank, queued.share.name, queued.share.next_weight) == (0, "chat", 2.0)
    await run_until(0.6)

    started = [e.request_id for e in sent if isinstance(e, messages.Started)]
    assert started[:4] == ["b0", "b1", "b2", "b3"] and started[4] == "i"  # ahead of b4..b7, in a full batch
    i_started = next(e for e in sent if isinstance(e, messages.Started) and e.request_id == "i")
    assert i_started.queue_time < 0.05
    snap = engine.snapshot(clock.monotonic())
    # b4..b7 wait; the sequence preempted for i is back in the batch since i finished
    assert snap.preemptions == 1 and snap.queued_by_class == [0, 0, 4]
    assert any(isinstance(e, messages.Finished) and e.request_id == "i" for e in sent)

    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    metrics.set_queues("n0", snap)
    metrics.set_queues("n0", snap)  # a counter moves by what is new only
    metrics.queued_for("n0", "interactive", i_started.queue_time)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"node": "n0", **labels})

    assert value("tierflow_node_preemptions_total", model=MODEL) == 1.0
    assert value("tierflow_node_queue_depth", request_class="batch") == 4.0
    assert value("tierflow_node_queue_depth", request_class="interactive") == 0.0
    assert value("tierflow_node_class_queue_time_seconds_count", request_class="interactive") == 1.0
    driver_stream = driver._streams["b5"]
    assert driver_stream.request_class == "batch"
