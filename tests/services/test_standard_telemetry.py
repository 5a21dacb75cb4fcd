"""Tracing and protocol details by the standards (issue 20): a caller's W3C trace context
continued from HTTP and gRPC through NATS to the node, whose span ends after the last
token; gRPC health following readiness; google.rpc error details; x-request-id; HEAD.

Registry, router and (when a test starts one) a decode node in this event loop over a real
nats-server, spans into an in-memory exporter; the gRPC and HTTP clients are real ones.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import pathlib

import grpc
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tierflow.contracts import subjects
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.runtime.tracing import set_span_processor
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings
from tierflow.services.router.main import main as router_main
from tierflow.services.router.settings import Settings as RouterSettings
from tierflow.v1 import inference_pb2 as pb
from tierflow.v1 import inference_pb2_grpc as pb_grpc

REPO = pathlib.Path(__file__).resolve().parents[2]
SPANS = InMemorySpanExporter()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
MODEL = "llama-3.1-8b"


class Fabric:
    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.http_port, self.grpc_port = free_port(), free_port()
        self.contexts: dict[str, ServiceContext] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str) -> None:
        ctx = self.contexts[name] = ServiceContext(service=name, instance=name)
        if name == "registry":
            main = registry_main(ctx, RegistrySettings(nats_url=self.nats_url, grpc_port=free_port(), fleet=str(REPO / "deploy/examples/fleet.yaml")))
        elif name == "router":
            main = router_main(ctx, RouterSettings(nats_url=self.nats_url, http_port=self.http_port, grpc_port=self.grpc_port, allow_anonymous=True, drain_grace=1.0))
        else:
            main = serve_node(ctx, NodeSettings(nats_url=self.nats_url, node_id="tel-0"), role="decode", subject=subjects.node_generate("tel-0"), service="decode-node")
        self.tasks[name] = asyncio.create_task(main)

    async def stop(self, name: str) -> None:
        self.contexts[name].stopping.set()
        await self.tasks.pop(name)

    def http(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
async def fabric(private_nats_url: str):
    set_span_processor(SimpleSpanProcessor(SPANS))
    fab = Fabric(private_nats_url)
    fab.start("registry")
    fab.start("router")
    yield fab
    for name in list(fab.tasks):
        await fab.stop(name)


async def _until(check, what: str, tries: int = 300) -> None:
    for _ in range(tries):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def _health(stub: health_pb2_grpc.HealthStub) -> int:
    try:
        return (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status
    except grpc.aio.AioRpcError:
        return -1


async def test_grpc_health_and_errors_follow_readiness(fabric: Fabric) -> None:
    """No node yet: NOT_SERVING, and a generation fails UNAVAILABLE with ErrorInfo and
    RetryInfo (HTTP: a 503 of type server_error, its code specific). A node: SERVING."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fabric.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await _until(lambda: _served(health, {health_pb2.HealthCheckResponse.NOT_SERVING}), "router NOT_SERVING before any node")

        stub = pb_grpc.InferenceStub(channel)
        async def models_loaded() -> bool:
            status, _, _ = await asyncio.to_thread(fabric.http, "GET", "/v1/models")
            return status == 200 and len(json.loads((await asyncio.to_thread(fabric.http, "GET", "/v1/models"))[2])["data"]) == 2
        await _until(models_loaded, "the registry's models reach the router")
        call = stub.GenerateUnary(pb.GenerateRequest(model=MODEL, prompt="hi", max_tokens=2), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(_Call(err.value))
        assert status is not None
        details = {d.type_url.rsplit("/", 1)[1]: d for d in status.details}
        info = error_details_pb2.ErrorInfo()
        details["google.rpc.ErrorInfo"].Unpack(info)
        assert info.domain == "tierflow" and info.reason and info.reason != "server_error"
        assert info.metadata["type"] == "server_error" and info.metadata["http_status"] == "503"
        retry = error_details_pb2.RetryInfo()
        details["google.rpc.RetryInfo"].Unpack(retry)
        assert retry.retry_delay.seconds >= 1

        # The same failure over HTTP: OpenAI's one 5xx type, the code says which failure.
        status_code, _, body = await asyncio.to_thread(fabric.http, "POST", "/v1/completions", {"content-type": "application/json"},
                                                       json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode())  # fmt: skip
        error = json.loads(body)["error"]
        assert status_code == 503 and error["type"] == "server_error" and error["code"] == info.reason

        # A 4xx: ErrorInfo with the OpenAI code, no RetryInfo.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GenerateUnary(pb.GenerateRequest(model="nope", prompt="x"), timeout=10)
        status = rpc_status.from_call(_Call(err.value))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and status is not None
        kinds = [d.type_url.rsplit("/", 1)[1] for d in status.details]
        assert kinds == ["google.rpc.ErrorInfo"]
        status.details[0].Unpack(info)
        assert info.reason == "model_not_found"

        fabric.start("node")
        await _until(lambda: _served(health, {health_pb2.HealthCheckResponse.SERVING}), "router SERVING once a node is live")


async def _served(stub: health_pb2_grpc.HealthStub, want: set[int]) -> bool:
    return await _health(stub) in want


class _Call:
    """What `rpc_status.from_call` reads, from an aio error (it wants the sync call's methods)."""

    def __init__(self, err: grpc.aio.AioRpcError) -> None:
        self._err = err

    def code(self) -> grpc.StatusCode:
        return self._err.code()

    def details(self) -> str | None:
        return self._err.details()

    def trailing_metadata(self):
        return tuple(self._err.trailing_metadata() or ())


async def test_a_traceparent_over_http_joins_router_and_node_spans_to_the_callers_trace(fabric: Fabric) -> None:
    await _ready(fabric)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{fabric.http_port}/v1", api_key="k", max_retries=0, timeout=30)
    SPANS.clear()
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "trace me"}], max_tokens=12, stream=True, extra_body={"ignore_eos": True},
        extra_headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "x-request-id": "caller-req-42"},
    )
    chunks = [c async for c in stream]
    completion_id = chunks[0].id
    spans = [s for s in SPANS.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID]
    router = next(s for s in spans if s.name == f"chat {MODEL}")
    send = next(s for s in spans if s.name.startswith("send "))
    node = next(s for s in spans if s.name == "node.generate")
    # One trace: caller -> router (SERVER) -> publish (PRODUCER) -> node (CONSUMER).
    assert router.kind is SpanKind.SERVER and router.parent is not None and f"{router.parent.span_id:016x}" == CALLER_SPAN
    assert send.kind is SpanKind.PRODUCER and send.parent.span_id == router.context.span_id
    assert node.kind is SpanKind.CONSUMER and node.parent.span_id == send.context.span_id
    a = router.attributes
    assert a["gen_ai.provider.name"] == "tierflow" and a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.response.model"] == MODEL and a["gen_ai.response.id"] == completion_id
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == fabric.http_port
    assert a["gen_ai.usage.output_tokens"] == 12 and a["gen_ai.usage.input_tokens"] > 0 and "error.type" not in a
    assert a["tierflow.client_request_id"] == "caller-req-42"
    # The node's span lasted to the last token: what only the end knows is on it (an
    # ended span takes no attributes), and it ended after the publish that started it.
    assert node.attributes["gen_ai.usage.output_tokens"] == 12 and node.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert node.end_time >= send.end_time and node.end_time <= router.end_time


async def test_a_traceparent_over_grpc_continues_the_trace_and_x_request_id_comes_back(fabric: Fabric) -> None:
    await _ready(fabric)
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    SPANS.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fabric.grpc_port}") as channel:
        call = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(model=MODEL, prompt="trace me", max_tokens=4), timeout=30,
            metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"), ("x-request-id", "grpc-caller-1")),
        )
        replies = [r async for r in call]
        assert dict(await call.initial_metadata())["x-request-id"] == "grpc-caller-1"
        unary = pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(model=MODEL, prompt="x", max_tokens=1), timeout=30)
        await unary
        assert dict(await unary.initial_metadata())["x-request-id"] == (await unary).id  # none sent: the router's own
    assert replies[-1].usage.completion_tokens >= 1
    spans = [s for s in SPANS.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]
    router = next(s for s in spans if s.kind is SpanKind.SERVER)
    assert f"{router.parent.span_id:016x}" == "b7ad6b7169203331" and router.attributes["server.port"] == fabric.grpc_port
    assert any(s.name == "node.generate" for s in spans)


async def test_x_request_id_is_echoed_when_valid_and_head_has_no_body(fabric: Fabric) -> None:
    await _ready(fabric)
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    status, headers, answer = await asyncio.to_thread(fabric.http, "POST", "/v1/completions", {"content-type": "application/json", "x-request-id": "req_abc-123"}, body)
    assert status == 200 and headers["x-request-id"] == "req_abc-123" and json.loads(answer)["id"].startswith("cmpl-")
    for bad in ("a b", "x" * 129, "é"):  # not echoed: the router's own id answers
        status, headers, answer = await asyncio.to_thread(fabric.http, "POST", "/v1/completions", {"content-type": "application/json", "x-request-id": bad.encode("utf-8").decode("latin-1")}, body)
        assert status == 200 and headers["x-request-id"] == json.loads(answer)["id"]
    # An error echoes it too.
    status, headers, _ = await asyncio.to_thread(fabric.http, "GET", "/v1/nowhere", {"x-request-id": "trace-9"})
    assert status == 404 and headers["x-request-id"] == "trace-9"

    status, _, get_body = await asyncio.to_thread(fabric.http, "GET", "/health")
    assert status == 200 and get_body
    status, head_headers, head_body = await asyncio.to_thread(fabric.http, "HEAD", "/health")
    assert status == 200 and head_body == b"" and head_headers["content-length"] == str(len(get_body))
    status, _, head_body = await asyncio.to_thread(fabric.http, "HEAD", "/metrics")
    assert status == 200 and head_body == b""


async def test_grpc_health_goes_not_serving_on_shutdown(fabric: Fabric) -> None:
    await _ready(fabric)
    seen: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fabric.grpc_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

        async def follow() -> None:
            try:
                async for reply in watch:
                    seen.append(reply.status)
            except grpc.aio.AioRpcError:
                pass  # the server went away after saying so

        follower = asyncio.create_task(follow())
        await _until(lambda: _true(seen == [health_pb2.HealthCheckResponse.SERVING]), "the watch reports SERVING")
        await fabric.stop("router")
        await asyncio.wait_for(follower, 10)
    assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING


async def _true(value: bool) -> bool:
    return value


async def _ready(fabric: Fabric) -> None:
    if "node" not in fabric.tasks:
        fabric.start("node")

    async def healthy() -> bool:
        status, _, _ = await asyncio.to_thread(fabric.http, "GET", "/health")
        return status == 200

    await _until(healthy, "router /health 200 (it has heard the node)")


async def test_the_registrys_grpc_health_follows_its_nats_link(tmp_path: pathlib.Path) -> None:
    """No NATS, no admin call can be stored: the registry says NOT_SERVING until it is back."""
    from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port
    from tierflow.services.model_registry.main import main as registry_main
    from tierflow.services.model_registry.settings import Settings as RegistrySettings

    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="registry-health")
    server = NatsServerProcess(config, tmp_path / "nats.log")
    await server.start()
    ctx, port = ServiceContext(service="model-registry", instance="health"), free_port()
    registry = asyncio.create_task(registry_main(ctx, RegistrySettings(nats_url=server.url, grpc_port=port, allow_unauthenticated_admin=True)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await _until(lambda: _served(health, {health_pb2.HealthCheckResponse.SERVING}), "registry SERVING with NATS up")
            await server.stop(grace=1)
            await _until(lambda: _served(health, {health_pb2.HealthCheckResponse.NOT_SERVING}), "registry NOT_SERVING without NATS")
            server = NatsServerProcess(config, tmp_path / "nats-again.log")  # the same port and store
            await server.start()
            await _until(lambda: _served(health, {health_pb2.HealthCheckResponse.SERVING}), "registry SERVING once NATS is back", tries=600)
    finally:
        ctx.stopping.set()
        await asyncio.gather(registry, return_exceptions=True)
        await server.stop(grace=1)
