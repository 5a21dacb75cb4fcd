"""Prefix locality known, not guessed (issue 17): nodes' KV events reach the router's
index over a real nats-server, and placement finds a prompt's node from it after the
node's heartbeat has long stopped listing the prompt's blocks.

Registry, two decode nodes and a router in one event loop; the router's `PrefixIndex` is
captured at construction so the test can read it.
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import urllib.error
import urllib.request

import nats
import openai
import pytest

from tierflow.contracts import messages, subjects
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.placement.prefix_index import PrefixIndex
from tierflow.rdu import block_hashes
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings
from tierflow.services.router import main as router_module
from tierflow.services.router.settings import Settings as RouterSettings

pytestmark = pytest.mark.timeout(120)
REPO = pathlib.Path(__file__).resolve().parents[2]
NODES = ("kvn-0", "kvn-1")
MODEL = "llama-3.1-8b"
BS = 64
CAPTURED: list[PrefixIndex] = []


class CapturedIndex(PrefixIndex):
    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        CAPTURED.append(self)


@pytest.fixture(scope="module")
async def fabric(private_nats_url: str):
    url = private_nats_url
    patch = pytest.MonkeyPatch()
    patch.setattr(router_module, "PrefixIndex", CapturedIndex)
    names = ("registry", *NODES, "router")
    contexts = {name: ServiceContext(service=name, instance=name) for name in names}
    http_port = free_port()
    fleet = str(REPO / "deploy/examples/fleet.yaml")
    tasks = [
        asyncio.create_task(registry_main(contexts["registry"], RegistrySettings(nats_url=url, grpc_port=free_port(), fleet=fleet))),
        *(
            asyncio.create_task(serve_node(contexts[n], NodeSettings(nats_url=url, node_id=n), role="decode", subject=subjects.node_generate(n), service="decode-node"))
            for n in NODES
        ),
        asyncio.create_task(router_module.main(contexts["router"], RouterSettings(nats_url=url, http_port=http_port, grpc_port=free_port(), allow_anonymous=True))),
    ]  # fmt: skip
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{http_port}/v1",
        api_key="k",
        max_retries=0,
        timeout=30,
    )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/health", timeout=5
            ) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    for _ in range(400):
        for t in tasks:
            if t.done():
                t.result()
        if (
            CAPTURED
            and all(CAPTURED[-1].knows(n) for n in NODES)
            and await asyncio.to_thread(healthy)
        ):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(
        1.5
    )  # a heartbeat later the router's views read the index's sets (until then, the heartbeats')
    nc = await nats.connect(url)
    yield client, CAPTURED[-1], nc
    await nc.close()
    patch.undo()
    for ctx in contexts.values():
        ctx.stopping.set()
    await asyncio.gather(*tasks)


async def until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def complete(client: openai.AsyncOpenAI, prompt: list[int]) -> tuple[str, str]:
    raw = await client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=2, extra_body={"ignore_eos": True}
    )
    raw.parse()
    return raw.headers["x-tierflow-node"], raw.headers["x-tierflow-placement"]


async def next_beat(nc: nats.NATS, node: str) -> messages.NodeHeartbeat:
    """The node's next heartbeat (and a moment for the router to apply it too). The router
    books a dispatched prompt on its node until then, so without it a request sent right
    after another looks queued behind it (placement's seconds pricing)."""
    beats = await nc.subscribe(subjects.node_heartbeat(node))
    hb = messages.heartbeat_decoder.decode((await beats.next_msg(timeout=5)).data)
    await beats.unsubscribe()
    await asyncio.sleep(0.1)
    return hb


async def direct(nc: nats.NATS, node: str, request_id: str, prompt: list[int]) -> None:
    """Served on `node` without the router: blocks the router did not place there."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    request = messages.GenerateRequest(
        request_id=request_id,
        model=MODEL,
        prompt_token_ids=prompt,
        max_tokens=1,
        ignore_eos=True,
    )
    await nc.publish(
        subjects.node_generate(node), messages.encoder.encode(request), reply=inbox
    )
    async with asyncio.timeout(10):
        async for msg in sub.messages:
            if isinstance(
                messages.stream_decoder.decode(msg.data),
                messages.Finished | messages.Failed,
            ):
                break
    await sub.unsubscribe()


async def test_the_router_index_knows_a_nodes_blocks_exactly_and_places_by_them_past_the_heartbeats_window(
    fabric,
) -> None:
    client, index, nc = fabric
    rng = random.Random(17)
    words = lambda n: [rng.randrange(1000, 100_000) for _ in range(n)]
    prefix = words(64 * BS)  # 64 blocks shared by every request below
    first, second, third = (prefix + words(2 * BS) for _ in range(3))

    node, _ = await complete(client, first)
    other = next(n for n in NODES if n != node)
    held = index.holder(node, MODEL)
    assert held is not None
    await until(lambda: set(block_hashes(first, BS)) <= held.keys())
    await next_beat(nc, node)
    again, placement = await complete(client, second)
    assert again == node and "prefix" in placement
    expected = set(block_hashes(first, BS)) | set(block_hashes(second, BS))
    await until(lambda: held.keys() == expected)
    assert len(expected) == 64 + 2 + 2 and not any(
        held.values()
    )  # exactly these blocks, all in HBM
    assert index.holder(other, MODEL) == {}

    # 5 x 64 other blocks on that node: its heartbeat's 256 recent hashes no longer list the prefix
    for i in range(5):
        await direct(nc, node, f"filler-{i}", words(64 * BS))
    hb = await next_beat(nc, node)
    recent = next(m.recent_prefix_hashes for m in hb.models if m.name == MODEL)
    assert len(recent) == 256
    assert not set(block_hashes(prefix, BS)) & set(recent)
    await until(lambda: len(held) == len(expected) + 5 * 64)
    assert set(block_hashes(prefix, BS)) <= held.keys()

    placed, placement = await complete(client, third)
    assert placed == node and "prefix" in placement
