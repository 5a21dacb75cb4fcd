"""Disaggregated serving in one event loop over a real nats-server: router -> prefill node
(prompt -> KV) -> decode node (KV transfer, then tokens)."""

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
MODEL = "llama-3.1-70b"


@pytest.fixture(scope="module")
async def disagg(private_nats_url: str):
    nats_url = private_nats_url
    ctxs: dict[str, ServiceContext] = {}
    tasks = []

    def start(name: str, coro_fn) -> None:
        ctxs[name] = ServiceContext(service=name, instance=name)
        tasks.append(asyncio.create_task(coro_fn(ctxs[name])))

    http_port = free_port()
    start("registry", lambda c: registry_main(c, RegistrySettings(nats_url=nats_url, grpc_port=free_port(), fleet=str(REPO / "tests/fleets/disagg.yaml"))))
    start("decode", lambda c: serve_node(c, NodeSettings(nats_url=nats_url, node_id="dd-0", deployment="disagg"), role="decode", subject=subjects.node_generate("dd-0"), service="decode-node"))
    for i in range(3):
        node = f"pf-{i}"
        start(node, lambda c, node=node: serve_node(c, NodeSettings(nats_url=nats_url, node_id=node, deployment="disagg"), role="prefill", subject=subjects.prefill_run(node), service="prefill-node"))
    start("router", lambda c: router_main(c, RouterSettings(nats_url=nats_url, http_port=http_port, grpc_port=free_port(), allow_anonymous=True)))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="k", max_retries=0, timeout=30)
    for _ in range(200):
        try:
            await client.completions.create(model=MODEL, prompt="ready?", max_tokens=1)
            break
        except (openai.APIConnectionError, openai.APIStatusError):
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.1)
    yield client, ctxs
    for ctx in ctxs.values():
        ctx.stopping.set()
    await asyncio.gather(*tasks)


def _prefill_count(ctxs: dict[str, ServiceContext]) -> float:
    total = 0.0
    for i in range(3):
        node = f"pf-{i}"
        total += ctxs[node].metrics.get_sample_value("tierflow_node_requests_total", {"node": node, "model": MODEL, "finish_reason": "prefill"}) or 0.0
    return total


async def test_requests_are_prefilled_on_a_prefill_node_then_decoded(disagg) -> None:
    client, ctxs = disagg
    before = _prefill_count(ctxs)
    prompt = "Summarize the following contract. " * 300  # ~2,100 tokens
    for i in range(4):
        raw = await client.completions.with_raw_response.create(model=MODEL, prompt=f"{i} {prompt}", max_tokens=8, extra_body={"ignore_eos": True})
        completion = raw.parse()
        assert completion.usage.completion_tokens == 8
        assert raw.headers["x-tierflow-node"] == "dd-0"
    assert _prefill_count(ctxs) - before == 4
    decoded = ctxs["decode"].metrics.get_sample_value("tierflow_node_requests_total", {"node": "dd-0", "model": MODEL, "finish_reason": "length"})
    assert decoded and decoded >= 4
