"""Registry, decode node and router in one event loop over a real nats-server.

Cheaper than a whole `tierflow up` and lets the test look inside: one connected trace per
request across router and node (W3C traceparent in NATS headers), and metrics whose
counts match the requests sent.
"""

from __future__ import annotations

import asyncio
import pathlib
import urllib.error
import urllib.request

import openai
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.runtime.tracing import set_span_processor
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings
from tierflow.services.router.main import main as router_main
from tierflow.services.router.settings import Settings as RouterSettings
from tierflow.contracts import subjects

REPO = pathlib.Path(__file__).resolve().parents[2]
SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module")
async def path(private_nats_url: str):
    nats_url = private_nats_url
    set_span_processor(SimpleSpanProcessor(SPANS))
    contexts = {name: ServiceContext(service=name, instance=name) for name in ("registry", "node", "router")}
    http_port = free_port()
    tasks = [
        asyncio.create_task(registry_main(contexts["registry"], RegistrySettings(nats_url=nats_url, grpc_port=free_port(), fleet=str(REPO / "deploy/examples/fleet.yaml")))),
        asyncio.create_task(serve_node(contexts["node"], NodeSettings(nats_url=nats_url, node_id="inproc-0"), role="decode", subject=subjects.node_generate("inproc-0"), service="decode-node")),
        asyncio.create_task(router_main(contexts["router"], RouterSettings(nats_url=nats_url, http_port=http_port, grpc_port=free_port(), allow_anonymous=True))),
    ]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="k", max_retries=0, timeout=30)
    for _ in range(200):
        try:
            if len((await client.models.list()).data) == 2:
                break
        except openai.APIConnectionError:
            pass
        for t in tasks:
            if t.done():
                t.result()
        await asyncio.sleep(0.05)
    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False

    for _ in range(200):  # and the router has heard the node (no test may race its first heartbeat)
        if await asyncio.to_thread(healthy):
            break
        await asyncio.sleep(0.05)
    yield client, contexts
    for ctx in contexts.values():
        ctx.stopping.set()
    await asyncio.gather(*tasks)


async def test_one_connected_trace_per_request_across_router_and_node(path) -> None:
    client, _ = path
    SPANS.clear()
    for _ in range(60):  # the node must be heard from before the router can place
        try:
            await client.chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": "trace me"}], max_tokens=4)
            break
        except openai.APIStatusError:
            await asyncio.sleep(0.1)
    SPANS.clear()
    for i in range(3):
        await client.chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": f"trace me {i}"}], max_tokens=4, extra_body={"ignore_eos": True})
    spans = SPANS.get_finished_spans()
    router_spans = [s for s in spans if s.name == "chat llama-3.1-8b"]
    node_spans = [s for s in spans if s.name == "node.generate"]
    assert len(router_spans) == 3 and len(node_spans) == 3
    for node_span in node_spans:
        parent = next(s for s in router_spans if s.context.trace_id == node_span.context.trace_id)
        # router (SERVER) -> its NATS publish (PRODUCER, "send <subject>") -> node (CONSUMER)
        send = next(s for s in spans if s.context.trace_id == node_span.context.trace_id and s.name.startswith("send "))
        assert node_span.parent is not None and node_span.parent.span_id == send.context.span_id
        assert send.parent is not None and send.parent.span_id == parent.context.span_id
        assert parent.attributes["gen_ai.request.model"] == "llama-3.1-8b"
        assert parent.attributes["gen_ai.usage.output_tokens"] == 4
    assert len({s.context.trace_id for s in router_spans}) == 3


async def test_metrics_count_the_requests_sent(path) -> None:
    client, contexts = path

    def router_count() -> float:
        return contexts["router"].metrics.get_sample_value("tierflow_e2e_request_latency_seconds_count", {"model": "gpt-oss-20b", "version": "v1", "tenant": "anonymous"}) or 0.0

    def node_count() -> float:
        return contexts["node"].metrics.get_sample_value("tierflow_node_requests_total", {"node": "inproc-0", "model": "gpt-oss-20b", "finish_reason": "length"}) or 0.0

    before_router, before_node = router_count(), node_count()
    for i in range(5):
        await client.completions.create(model="gpt-oss-20b", prompt=f"count {i}", max_tokens=3, extra_body={"ignore_eos": True})
    assert router_count() - before_router == 5
    assert node_count() - before_node == 5
