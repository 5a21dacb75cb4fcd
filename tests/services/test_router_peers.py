"""Two routers over one real nats-server split a tenant's rate limit: together they admit
what the configuration says, not twice that."""

from __future__ import annotations

import asyncio
import pathlib

import openai
import pytest

from tierflow.contracts import subjects
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings
from tierflow.services.router.main import main as router_main
from tierflow.services.router.settings import Settings as RouterSettings

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "tests/fleets/router-tenants.yaml"  # tenant `tiny`: 0.5 requests/s, burst 2
ROUTERS = ("ra", "rb")


async def _until(predicate, what: str, tasks: list[asyncio.Task[None]], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.05)


async def test_two_routers_each_admit_half_of_a_tenants_burst(private_nats_url: str) -> None:
    contexts = {name: ServiceContext(service=name, instance=name) for name in ("registry", "node", *ROUTERS)}
    ports = {name: free_port() for name in ROUTERS}
    tasks = [
        asyncio.create_task(registry_main(contexts["registry"], RegistrySettings(nats_url=private_nats_url, grpc_port=free_port(), fleet=str(REPO / "deploy/examples/fleet.yaml")))),
        asyncio.create_task(serve_node(contexts["node"], NodeSettings(nats_url=private_nats_url, node_id="peers-0", region="eu-west"),
                                       role="decode", subject=subjects.node_generate("peers-0"), service="decode-node")),  # fmt: skip
        *(
            asyncio.create_task(router_main(contexts[name], RouterSettings(
                nats_url=private_nats_url, router_id=name, http_port=ports[name], grpc_port=free_port(), config=str(CONFIG), peer_interval=0.2,
            )))  # fmt: skip
            for name in ROUTERS
        ),
    ]
    clients = {
        (name, key): openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{ports[name]}/v1", api_key=key, max_retries=0, timeout=30)
        for name in ROUTERS for key in ("sk-tiny", "sk-globex")
    }  # fmt: skip

    async def ask(router: str, key: str) -> int:
        try:
            await clients[router, key].chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    async def both_count_two() -> bool:
        return all(contexts[name].metrics.get_sample_value("tierflow_router_peers") == 2 for name in ROUTERS)

    async def both_serve() -> bool:  # the node heard by both routers (an unlimited tenant asks)
        return [await ask(name, "sk-globex") for name in ROUTERS] == [200, 200]

    try:
        await _until(both_count_two, "both routers counting two routers", tasks)
        await _until(both_serve, "both routers serving", tasks)
        # Each router keeps a burst of 1 of the tenant's 2 (and 0.25 of its 0.5 requests/s):
        # its first request passes, the next is refused; together, the configured 2.
        answers = {name: [await ask(name, "sk-tiny"), await ask(name, "sk-tiny")] for name in ROUTERS}
        assert answers == {"ra": [200, 429], "rb": [200, 429]}
        # One router gone: the other takes the whole limit back.
        contexts["rb"].stopping.set()
        await _until(lambda: _one(contexts["ra"]), "ra counting itself alone", tasks[:-1])
        await asyncio.sleep(4.0)  # a whole token refills at 0.25/s; then the full burst of 2 applies again
        assert [await ask("ra", "sk-tiny") for _ in range(3)] == [200, 200, 429]
    finally:
        for ctx in contexts.values():
            ctx.stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients.values():
            await client.close()


async def _one(ctx: ServiceContext) -> bool:
    return ctx.metrics.get_sample_value("tierflow_router_peers") == 1


pytestmark = pytest.mark.timeout(120)
