"""The gRPC front door and the registry admin API, over real channels."""

from __future__ import annotations

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tierflow.v1 import inference_pb2 as pb
from tierflow.v1 import inference_pb2_grpc as pb_grpc
from tierflow.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.fabric


@pytest.fixture(scope="module")
def channel(fabric):
    with grpc.insecure_channel(f"{fabric.host}:{fabric.grpc_port}") as ch:
        yield ch


def _request(**kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="llama-3.1-8b", prompt="The capital of France is", max_tokens=20, seed=5, **kw)


def test_streamed_generate_gives_the_same_tokens_as_http(fabric, channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    chunks = list(stub.Generate(_request(), timeout=30))
    text = "".join(c.text for c in chunks)
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length") and last.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    http = openai.OpenAI(base_url=fabric.base_url, api_key="k", max_retries=0).completions.create(
        model="llama-3.1-8b", prompt="The capital of France is", max_tokens=20, seed=5
    )
    assert text == http.choices[0].text
    assert last.usage.prompt_tokens == http.usage.prompt_tokens


def test_unary_generate_matches_stream(channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    unary = stub.GenerateUnary(_request(), timeout=30)
    streamed = "".join(c.text for c in stub.Generate(_request(), timeout=30))
    assert unary.text == streamed and unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens


def test_chat_messages_over_grpc(channel) -> None:
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    resp = pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(model="gpt-oss-20b", messages=msgs, max_tokens=8), timeout=30)
    assert resp.usage.completion_tokens >= 1 and resp.model == "gpt-oss-20b"


def test_grpc_errors_map_to_status_codes(channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(model="nope", prompt="x"), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateUnary(pb.GenerateRequest(model="llama-3.1-8b"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="tierflow.v1.Inference")).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"tierflow.v1.Inference", "grpc.health.v1.Health"} <= names


def test_registry_admin_lists_models_and_deployments(fabric) -> None:
    with grpc.insecure_channel(f"{fabric.host}:{fabric.registry_grpc_port}") as ch:
        stub = registry_pb2_grpc.ModelRegistryStub(ch)
        models = stub.ListModels(registry_pb2.ListModelsRequest(), timeout=10).models
        assert sorted(m.name for m in models) == ["gpt-oss-20b", "llama-3.1-8b"]
        deployments = stub.ListDeployments(registry_pb2.ListDeploymentsRequest(), timeout=10).deployments
        assert [d.name for d in deployments] == ["default"] and len(deployments[0].models) == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModel(registry_pb2.GetModelRequest(name="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND



def test_request_classes_over_grpc(fabric, channel) -> None:
    """Issue 21, on the open tenant (default class standard, nothing higher): a class above
    it, in the field or the metadata (which wins), is PERMISSION_DENIED naming it; a batch
    request (`flex` in the field, `batch` in the metadata) runs as batch, in the request
    record and in admission's per-tenant counters."""
    stub = pb_grpc.InferenceStub(channel)
    for request, metadata in ((_request(service_tier="interactive"), ()), (_request(service_tier="flex"), (("x-tierflow-class", "priority"),))):
        with pytest.raises(grpc.RpcError) as err:
            stub.GenerateUnary(request, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'interactive'" in err.value.details()
    batch = {"model": "llama-3.1-8b", "tenant": "anonymous", "class": "batch"}
    before = fabric.router_metric("tierflow_router_admission_tenant_admitted_total", **batch)
    for request, metadata in ((_request(service_tier="flex"), ()), (_request(), (("x-tierflow-class", "batch"),))):
        response, call = stub.GenerateUnary.with_call(request, metadata=metadata, timeout=30)
        assert response.usage.completion_tokens >= 1
        request_id = dict(call.initial_metadata())["x-request-id"]
        assert fabric.request_record(request_id)["request_class"] == "batch"
    assert fabric.router_metric("tierflow_router_admission_tenant_admitted_total", **batch) == before + 2
