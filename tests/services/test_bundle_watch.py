"""A node whose deployment's bundle changes in the registry says so (heartbeat, metric,
log), and says so no more when the registry holds its bundle again."""

from __future__ import annotations

import asyncio
import pathlib

import msgspec
import nats

from tierflow.contracts import messages, registry, subjects
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.runtime.kv import open_bucket
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings

REPO = pathlib.Path(__file__).resolve().parents[2]
NODE = "watch-0"


async def test_a_changed_bundle_is_reported_until_it_is_changed_back(private_nats_url: str) -> None:
    contexts = {name: ServiceContext(service=name, instance=name) for name in ("registry", "node")}
    tasks = [
        asyncio.create_task(registry_main(contexts["registry"], RegistrySettings(nats_url=private_nats_url, grpc_port=free_port(), fleet=str(REPO / "deploy/examples/fleet.yaml")))),
        asyncio.create_task(serve_node(contexts["node"], NodeSettings(nats_url=private_nats_url, node_id=NODE, heartbeat_interval=0.2),
                                       role="decode", subject=subjects.node_generate(NODE), service="decode-node")),  # fmt: skip
    ]
    nc = await nats.connect(private_nats_url)
    beats: list[messages.NodeHeartbeat] = []

    async def on_beat(msg) -> None:
        beats.append(messages.heartbeat_decoder.decode(msg.data))

    await nc.subscribe(subjects.node_heartbeat(NODE), cb=on_beat)

    def outdated() -> float | None:
        return contexts["node"].metrics.get_sample_value("tierflow_node_bundle_outdated", {"node": NODE})

    async def until(predicate, what: str) -> None:
        async with asyncio.timeout(20):
            while not predicate():
                for t in tasks:
                    if t.done():
                        t.result()
                await asyncio.sleep(0.05)

    try:
        await until(lambda: beats and outdated() == 0.0, "the node beating, its bundle current")
        kv = await open_bucket(nc.jetstream(), subjects.REGISTRY_BUCKET)
        key = subjects.deployment_key("default")
        original = (await kv.get(key)).value
        record = registry.deployment_decoder.decode(original)
        changed = msgspec.structs.replace(record, models=[msgspec.structs.replace(record.models[0], config="ss16384-bs4"), *record.models[1:]])
        await kv.put(key, messages.encoder.encode(changed))
        await until(lambda: beats[-1].bundle_outdated and outdated() == 1.0, "the change reported")
        await kv.put(key, original)
        await until(lambda: not beats[-1].bundle_outdated and outdated() == 0.0, "the report withdrawn")
    finally:
        await nc.close()
        for ctx in contexts.values():
            ctx.stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
