"""Embedding and reranker models bundled beside a chat model on the same nodes (issue 20):
the official client's `embeddings.create` (float and base64, dimensions, batches), a rerank
call over plain HTTP (the client has none), and an agent pipeline end to end: retrieve with
embeddings, rerank, then chat with tools, every model served by the same two nodes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import jsonschema
import numpy as np
import openai
import pytest

from tierflow.harness import Fabric
from tierflow.v1 import inference_pb2 as pb
from tierflow.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fabric

EMBED, MATRYOSHKA, RERANK, CHAT = "bge-large-en-v1.5", "nomic-embed-text-v1.5", "bge-reranker-v2-m3", "llama-3.1-8b"
DOCS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Bananas are rich in potassium and grow in tropical climates.",
    "Paris hosts the Louvre, the most visited museum in the world.",
    "Photosynthesis converts light into chemical energy in plants.",
    "The weather in Paris is mild in spring, with frequent rain.",
]
QUERY = "What is the weather like in Paris?"
WEATHER = {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["location", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def agents(fabric_factory: Any, tmp_path_factory: pytest.TempPathFactory, repo_root: Any) -> Iterator[Fabric]:
    running = fabric_factory(tmp_path_factory.mktemp("agents"), "--fleet", str(repo_root / "tests/fleets/agents.yaml"),
                             "--deployment", "agents", "--actuator", "none")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(agents: Fabric) -> openai.OpenAI:
    return openai.OpenAI(base_url=agents.base_url, api_key="test-key", max_retries=0, timeout=30)


def _post(fabric: Fabric, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(f"{fabric.base_url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": "Bearer test-key"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def test_embeddings_float_base64_batch_and_dimensions(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=EMBED, input=DOCS, encoding_format="float")
    assert [d.index for d in floats.data] == list(range(len(DOCS))) and floats.model == EMBED
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (len(DOCS), 1024) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(DOCS)
    b64 = client.embeddings.create(model=EMBED, input=DOCS)  # the client asks base64 and decodes it
    assert np.allclose(np.array([d.embedding for d in b64.data]), vectors, atol=1e-6)
    one = client.embeddings.create(model=EMBED, input=DOCS[2], encoding_format="float")
    assert np.allclose(one.data[0].embedding, vectors[2], atol=1e-6)  # same input, same vector, alone or in a batch
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[1]  # both about Paris vs bananas
    ids = client.embeddings.create(model=EMBED, input=[[101, 2054, 2003], [101, 2054, 2003]], encoding_format="float")
    assert ids.data[0].embedding == ids.data[1].embedding and ids.usage.prompt_tokens == 6
    full = client.embeddings.create(model=MATRYOSHKA, input=DOCS[:2], encoding_format="float")
    short = client.embeddings.create(model=MATRYOSHKA, input=DOCS[:2], dimensions=256, encoding_format="float")
    prefix = np.array(full.data[0].embedding[:256])
    assert len(short.data[0].embedding) == 256 and np.allclose(short.data[0].embedding, prefix / np.linalg.norm(prefix), atol=1e-5)


def test_embeddings_refusals_name_the_field(client: openai.OpenAI, agents: Fabric) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=EMBED, input="x", dimensions=256)
    assert refused.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=CHAT, input="x")
    assert refused.value.body["code"] == "wrong_model_kind"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "model"
    cases = [({"model": EMBED, "input": ["ok", 3]}, "input[1]"), ({"model": EMBED, "input": ["ok", ""]}, "input[1]"),
             ({"model": EMBED, "input": []}, "input"), ({"model": EMBED}, "input"), ({"model": EMBED, "input": "x", "colour": 1}, "colour"),
             ({"model": EMBED, "input": "x", "encoding_format": "int8"}, "encoding_format"),
             ({"model": EMBED, "input": " ".join(["word"] * 600)}, "input")]
    for body, param in cases:
        status, answer, _ = _post(agents, "/embeddings", body)
        assert status == 400 and answer["error"]["param"] == param, (body, answer)
    status, answer, _ = _post(agents, "/embeddings", {"model": "nope", "input": "x"})
    assert status == 404


def test_rerank_sorts_by_relevance_with_top_n_and_documents(agents: Fabric) -> None:
    status, answer, headers = _post(agents, "/rerank", {"model": RERANK, "query": QUERY, "documents": [*DOCS[:4], {"text": DOCS[4]}], "top_n": 3})
    assert status == 200, answer
    results = answer["results"]
    assert len(results) == 3 and results[0]["index"] == 4 and results[0]["document"] == {"text": DOCS[4]}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert answer["usage"]["total_tokens"] > 0 and headers["x-tierflow-node"]
    again = _post(agents, "/rerank", {"model": RERANK, "query": QUERY, "documents": DOCS, "return_documents": False})[1]
    assert len(again["results"]) == len(DOCS) and "document" not in again["results"][0]
    assert again["results"][0]["relevance_score"] == results[0]["relevance_score"]  # deterministic
    for body, param in [({"model": RERANK, "query": QUERY, "documents": []}, "documents"),
                        ({"model": RERANK, "query": QUERY, "documents": DOCS, "top_n": -1}, "top_n"),
                        ({"model": EMBED, "query": QUERY, "documents": DOCS}, "model"),
                        ({"model": RERANK, "documents": DOCS}, "query")]:
        status, refused, _ = _post(agents, "/rerank", body)
        assert status == 400 and refused["error"]["param"] == param, (body, refused)


def test_agent_pipeline_retrieve_rerank_then_chat_with_tools(client: openai.OpenAI, agents: Fabric) -> None:
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=DOCS, encoding_format="float")
    corpus = np.array([d.embedding for d in raw.parse().data])
    nodes = set(raw.headers["x-tierflow-node"].split(","))
    query = np.array(client.embeddings.create(model=EMBED, input=QUERY, encoding_format="float").data[0].embedding)
    retrieved = [int(i) for i in np.argsort(-(corpus @ query))[:3]]
    assert 4 in retrieved and 1 not in retrieved  # the weather document is retrieved, bananas are not
    status, ranked, headers = _post(agents, "/rerank", {"model": RERANK, "query": QUERY, "documents": [DOCS[i] for i in retrieved], "top_n": 2})
    assert status == 200
    nodes |= set(headers["x-tierflow-node"].split(","))
    context = "\n".join(r["document"]["text"] for r in ranked["results"])
    assert DOCS[4] in context
    chat = client.chat.completions.with_raw_response.create(
        model=CHAT, tools=TOOLS, tool_choice="required", seed=7, max_tokens=200,
        messages=[{"role": "system", "content": f"Answer from the context:\n{context}"}, {"role": "user", "content": QUERY}],
    )
    nodes.add(chat.headers["x-tierflow-node"])
    call = chat.parse().choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert 1 <= len(nodes) <= 2  # four models, one deployment of two nodes: they share the nodes


def test_grpc_embed_and_rerank_match_http(agents: Fabric, client: openai.OpenAI) -> None:
    auth = (("authorization", "Bearer test-key"),)
    with grpc.insecure_channel(f"{agents.host}:{agents.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        answer = stub.Embed(pb.EmbedRequest(model=MATRYOSHKA, inputs=DOCS[:3], dimensions=128), metadata=auth, timeout=30)
        http = client.embeddings.create(model=MATRYOSHKA, input=DOCS[:3], dimensions=128, encoding_format="float")
        assert [e.index for e in answer.data] == [0, 1, 2] and answer.usage.prompt_tokens == http.usage.prompt_tokens
        assert np.allclose([list(e.values) for e in answer.data], [d.embedding for d in http.data], atol=1e-6)
        ranked = stub.Rerank(pb.RerankRequest(model=RERANK, query=QUERY, documents=DOCS, top_n=2, return_documents=True), metadata=auth, timeout=30)
        assert [r.index for r in ranked.results][0] == 4 and ranked.results[0].document == DOCS[4]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(model=CHAT, inputs=["x"]), metadata=auth, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
