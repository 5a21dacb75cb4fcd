"""A node ends streams nobody will read: past their deadline, of a router that died, or
broken by a message it could not publish; and it keeps serving through all of it.

Real nats-server and a real node (serve_node) in this event loop, except the publish
failure, which is staged at the driver's port.
"""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from tierflow.contracts import messages, subjects
from tierflow.nodehost.driver import EngineDriver
from tierflow.nodehost.routers import RouterLiveness
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, BundleModel, DeploymentConfig, NodeEngine
from tierflow.runtime.clock import WallClock
from tierflow.runtime.service import ServiceContext

pytestmark = pytest.mark.timeout(90)
NODE = "resilient-0"
MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
async def node(private_nats_url: str):
    """The registry (for the node's bundle) and one decode node that abandons silent routers after 1 s."""
    import pathlib

    from tierflow.runtime.nats_server import free_port
    from tierflow.services.model_registry.main import main as registry_main
    from tierflow.services.model_registry.settings import Settings as RegistrySettings

    repo = pathlib.Path(__file__).resolve().parents[2]
    contexts = {name: ServiceContext(service=name, instance=name) for name in ("registry", "node")}
    tasks = [
        asyncio.create_task(registry_main(contexts["registry"], RegistrySettings(nats_url=private_nats_url, grpc_port=free_port(), fleet=str(repo / "deploy/examples/fleet.yaml")))),
        asyncio.create_task(serve_node(contexts["node"], NodeSettings(nats_url=private_nats_url, node_id=NODE, router_abandon_after=1.0),
                                       role="decode", subject=subjects.node_generate(NODE), service="decode-node")),  # fmt: skip
    ]
    nc = await nats.connect(private_nats_url)
    for _ in range(300):
        try:
            await nc.request(subjects.node_control(NODE), messages.encoder.encode(messages.NodeCommand(action="status")), timeout=0.5)
            break
        except Exception:
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.1)
    yield nc, contexts["node"]
    await nc.close()
    for ctx in contexts.values():
        ctx.stopping.set()
    await asyncio.gather(*tasks)


async def _in_flight(nc) -> int:
    reply = await nc.request(subjects.node_control(NODE), messages.encoder.encode(messages.NodeCommand(action="status")), timeout=2)
    return messages.command_reply_decoder.decode(reply.data).in_flight


def _long(request_id: str, **kw) -> bytes:
    return messages.encoder.encode(messages.GenerateRequest(
        request_id=request_id, model=MODEL, prompt_token_ids=list(range(50)), max_tokens=4000, ignore_eos=True, **kw,
    ))  # fmt: skip


async def test_the_node_drops_work_past_its_deadline_and_says_so(node) -> None:
    nc, ctx = node
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    sent = time.monotonic()
    await nc.publish(subjects.node_generate(NODE), _long("late-1", timeout_s=0.5), reply=inbox)
    failed = None
    async with asyncio.timeout(10):
        async for msg in sub.messages:
            event = messages.stream_decoder.decode(msg.data)
            if isinstance(event, messages.Failed):
                failed = event
                break
    assert failed is not None and failed.code == "deadline_exceeded" and not failed.retryable
    assert 0.5 <= time.monotonic() - sent < 3.0
    assert await _in_flight(nc) == 0
    assert ctx.metrics.get_sample_value("tierflow_node_requests_dropped_total", {"node": NODE, "model": MODEL, "reason": "deadline_exceeded"}) == 1


async def test_streams_of_a_router_that_fell_silent_are_dropped(node) -> None:
    nc, ctx = node
    presence = messages.encoder.encode(messages.RouterPresence(router_id="gone-router"))
    await nc.publish(subjects.router_presence("gone-router"), presence)
    await nc.flush()
    await asyncio.sleep(0.1)  # the node hears it before the request (ordering across subjects)
    reply = subjects.router_stream("gone-router", "g-1_1")
    tokens = await nc.subscribe(reply)
    await nc.publish(subjects.node_generate(NODE), _long("g-1"), reply=reply)
    async with asyncio.timeout(5):
        await tokens.next_msg(timeout=5)  # it is being served
    assert await _in_flight(nc) == 1
    # The router says nothing more: after abandon_after (1 s) the node frees the slot.
    async with asyncio.timeout(10):
        while await _in_flight(nc):
            await asyncio.sleep(0.1)
    assert ctx.metrics.get_sample_value("tierflow_node_requests_dropped_total", {"node": NODE, "model": MODEL, "reason": "router_gone"}) == 1


async def test_a_new_attempt_of_a_request_supersedes_the_old_stream_and_a_resend_is_a_duplicate(node) -> None:
    """The router resumed a request on this same node (its NATS link broke, its cancel was
    lost): the new attempt (its own reply subject) replaces the old stream; the same
    attempt sent twice is refused."""
    nc, ctx = node
    first, second = nc.new_inbox(), nc.new_inbox()
    old_sub, new_sub = await nc.subscribe(first), await nc.subscribe(second)
    await nc.publish(subjects.node_generate(NODE), _long("again-1"), reply=first)
    await old_sub.next_msg(timeout=5)
    await nc.publish(subjects.node_generate(NODE), _long("again-1", attempt=2, resume_token_ids=[7, 8]), reply=second)
    event = messages.stream_decoder.decode((await new_sub.next_msg(timeout=5)).data)
    if isinstance(event, messages.Accepted):  # queued for a moment (the engine was mid-step on a busy machine)
        event = messages.stream_decoder.decode((await new_sub.next_msg(timeout=5)).data)
    assert isinstance(event, messages.Started)  # the new attempt runs
    assert await _in_flight(nc) == 1  # the old stream is gone, not running beside it
    assert ctx.metrics.get_sample_value("tierflow_node_requests_dropped_total", {"node": NODE, "model": MODEL, "reason": "superseded"}) == 1
    await nc.publish(subjects.node_generate(NODE), _long("again-1", attempt=2), reply=second)
    async with asyncio.timeout(5):
        while True:
            event = messages.stream_decoder.decode((await new_sub.next_msg(timeout=5)).data)
            if isinstance(event, messages.Failed):
                break
    assert event.code == "duplicate_request"
    await nc.publish(subjects.node_cancel(NODE), messages.encoder.encode(messages.CancelRequest(request_id="again-1")))


async def test_a_router_that_keeps_announcing_itself_keeps_its_streams(node) -> None:
    nc, _ = node
    reply = subjects.router_stream("alive-router", "a-1_1")
    sub = await nc.subscribe(reply)
    presence = messages.encoder.encode(messages.RouterPresence(router_id="alive-router"))
    await nc.publish(subjects.router_presence("alive-router"), presence)
    await nc.publish(subjects.node_generate(NODE), messages.encoder.encode(messages.GenerateRequest(
        request_id="a-1", model=MODEL, prompt_token_ids=list(range(50)), max_tokens=600, ignore_eos=True,
    )), reply=reply)  # fmt: skip
    finished = None
    async with asyncio.timeout(20):
        while finished is None:
            await nc.publish(subjects.router_presence("alive-router"), presence)
            try:
                msg = await sub.next_msg(timeout=0.3)
            except nats.errors.TimeoutError:
                continue
            event = messages.stream_decoder.decode(msg.data)
            if isinstance(event, messages.Finished):
                finished = event
    assert finished.completion_tokens == 600


async def test_a_message_that_cannot_be_published_breaks_only_its_stream() -> None:
    """NATS down and the client's buffer full: that stream is dropped (its reader would
    see a gap) and its slot freed; the engine loop itself keeps running."""
    bundle = [BundleModel(BUILTIN_MODELS[MODEL], DeploymentConfig.parse("ss8192-bs4"))]
    clock = WallClock()
    engine = NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=clock.monotonic(), preload=[MODEL])
    sent: dict[str, list[messages.StreamEvent]] = {"ok": [], "bad": []}
    dropped: list[tuple[str, str]] = []

    async def publish(reply: str, data: bytes) -> None:
        event = messages.stream_decoder.decode(data)
        if reply == "bad" and isinstance(event, messages.Tokens) and event.index >= 3:
            raise nats.errors.OutboundBufferLimitError()
        sent[reply].append(event)

    driver = EngineDriver(engine, clock, publish, "n", on_dropped=lambda rid, model, reason: dropped.append((rid, reason)), routers=RouterLiveness())
    stop = asyncio.Event()
    runner = asyncio.create_task(driver.run(stop))
    for rid in ("ok", "bad"):
        await driver.submit(messages.GenerateRequest(request_id=rid, model=MODEL, prompt_token_ids=[1, 2, 3], max_tokens=40, ignore_eos=True), rid)
    async with asyncio.timeout(20):
        while not any(isinstance(e, messages.Finished) for e in sent["ok"]):
            await asyncio.sleep(0.01)
    stop.set()
    await runner
    assert dropped == [("bad", "publish_failed")] and driver.in_flight == 0
    assert not any(isinstance(e, messages.Finished) for e in sent["bad"])
    assert sum(len(e.token_ids) for e in sent["ok"] if isinstance(e, messages.Tokens)) == 40
