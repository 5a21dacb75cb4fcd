"""The router's HTTP API as an OpenAPI 3.1 document (served at `GET /openapi.json`).

Request bodies are the very Structs the API decodes with (`openai_schema`), so their
limits (`Meta`) appear in the document as JSON Schema bounds; responses are described by
the Structs below, which the handlers' JSON must match (the schemathesis test in
tests/security/test_fuzz_http.py checks every response it provokes against them). The
document is built once, on first request, and kept as bytes.

Paths are `PATHS`; `tests/security/test_openapi.py` holds them equal to the router's
routing table, so a new route cannot go undocumented.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from tierflow.services.router.encoders_api import EmbeddingsBody, RerankBody
from tierflow.services.router.openai_schema import LIMITS, ChatCompletionRequest, CompletionRequest

__all__ = ["PATHS", "openapi_document", "openapi_json"]

_REF = "#/components/schemas/{name}"


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct):
    """OpenAI's error shape: every 4xx and 5xx of this API has it."""

    error: ErrorDetail


class PromptTokensDetails(Struct):
    cached_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CalledFunction(Struct):
    name: str
    arguments: str  # JSON valid against the tool's `parameters`


class ToolCallOut(Struct):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(Struct):
    """`content` is null when the answer is a tool call (`tool_calls`, finish_reason `tool_calls`)."""

    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None  # with `logprobs: true`
    finish_reason: str  # stop | length | tool_calls


class ChatCompletion(Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None  # with `logprobs: <int>`
    finish_reason: str


class Completion(Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ToolCallDelta(Struct):
    index: int
    function: dict[str, str]  # the first: name and arguments ""; then arguments as they come
    id: str | None = None
    type: Literal["function"] | None = None


class Delta(Struct):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(Struct):
    """One SSE event of a streamed chat completion (`usage` only with `include_usage`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionChunk(Struct):
    """One SSE event of a streamed text completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class Model(Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(Struct):
    object: Literal["list"]
    data: list[Model]


class Health(Struct):
    status: Literal["ok", "unavailable"]
    nats: Literal["connected", "disconnected"]
    nodes: int
    models: int


class Embedding(Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 (`encoding_format`)


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct):
    """OpenAI's embeddings response: one unit vector per input, in input order."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class RerankDocument(Struct):
    text: str


class RerankResult(Struct):
    index: int  # the document's position in the request
    relevance_score: float  # in (0, 1); results are sorted by it, best first
    document: RerankDocument | None = None  # with `return_documents` (the default)


class RerankResponse(Struct):
    """The rerank response Cohere, Jina and vLLM share."""

    id: str
    object: Literal["rerank"]
    model: str
    created: int
    results: list[RerankResult]
    usage: EmbeddingUsage


_STRUCTS = (
    ChatCompletionRequest, CompletionRequest, ErrorResponse, ChatCompletion, Completion, ChatCompletionChunk, CompletionChunk,
    Model, ModelList, Health, EmbeddingsBody, RerankBody, EmbeddingList, RerankResponse,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*statuses: int) -> dict[str, Any]:
    why = {
        400: "The request is malformed or over a limit; `param` names the field.",
        401: "Missing or unknown API key (checked before the body is read).",
        404: "Unknown route, or a model that is not deployed (`code: model_not_found`).",
        405: "The path exists with another method.",
        408: "The request head or body arrived too slowly.",
        413: "The body is larger than the router accepts (8 MiB).",
        429: "Over the tenant's rate limit or quota, or the model is at its admission limit (`Retry-After`).",
        503: "Nothing can serve the request now (`Retry-After`), or the connection limit.",
        504: "The request's own deadline (`x-tierflow-timeout`, the tenant's) passed.",
    }
    return {str(s): {"description": why[s], "content": _json("ErrorResponse")} for s in statuses}


_HEADERS = [
    {"name": "x-session-id", "in": "header", "required": False, "description": "Keeps an agent's steps on one node.",
     "schema": {"type": "string", "maxLength": 256}},
    {"name": "x-tierflow-workload", "in": "header", "required": False, "description": "Placement hint.",
     "schema": {"type": "string", "enum": ["interactive", "batch"]}},
    {"name": "x-tierflow-timeout", "in": "header", "required": False,
     "description": "Seconds the whole request may take (a 504 past it).", "schema": {"type": "number", "minimum": 1, "maximum": 3600}},
]


def _sse(chunk: str) -> dict[str, Any]:
    """One Server-Sent Event (schemathesis and OpenAPI 3.1 validate each event): its
    `data` is a chunk, an error (after the first token), or the final `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}}
    return {"type": "object", "required": ["data"], "properties": {"event": {"const": "message"}, "data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def _generation(summary: str, request: str, response: str, chunk: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": _HEADERS,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": "The completion; with `stream: true`, Server-Sent Events of chunks ending in `data: [DONE]`.",
                    "content": {**_json(response), "text/event-stream": {"schema": _sse(chunk)}},
                },
                **_errors(400, 401, 404, 408, 413, 429, 503, 504),
            },
        }
    }


PATHS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": _generation("Chat completion (OpenAI)", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
    "/v1/completions": _generation("Text completion (OpenAI)", "CompletionRequest", "Completion", "CompletionChunk"),
    "/v1/embeddings": {"post": {
        "summary": "Embeddings (OpenAI): one vector per input from an embedding model; `dimensions` on Matryoshka models",
        "parameters": _HEADERS[1:],
        "requestBody": {"required": True, "content": _json("EmbeddingsBody")},
        "responses": {"200": {"description": "The vectors", "content": _json("EmbeddingList")}, **_errors(400, 401, 404, 408, 413, 429, 503, 504)},
    }},
    "/v1/rerank": {"post": {
        "summary": "Rerank (Cohere/Jina/vLLM shape): documents scored against a query by a reranker model, best first",
        "parameters": _HEADERS[1:],
        "requestBody": {"required": True, "content": _json("RerankBody")},
        "responses": {"200": {"description": "The ranking", "content": _json("RerankResponse")}, **_errors(400, 401, 404, 408, 413, 429, 503, 504)},
    }},
    "/v1/models": {"get": {"summary": "Models registered and deployed", "responses": {"200": {"description": "The models", "content": _json("ModelList")}}}},
    "/v1/models/{model}": {"get": {
        "summary": "One model",
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The model", "content": _json("Model")}, **_errors(404)},
    }},
    "/health": {"get": {"summary": "Whether the router can serve (NATS connected, a live node)", "responses": {
        "200": {"description": "Serving", "content": _json("Health")},
        "503": {"description": "Not serving now", "content": _json("Health")},
    }}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
    }}},
    "/openapi.json": {"get": {"summary": "This document", "responses": {
        "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}},
    }}},
}


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    """The whole document as a dict."""
    _, components = msgspec.json.schema_components(_STRUCTS, ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tierflow router",
            "version": version,
            "description": "OpenAI-compatible inference API of the tierflow fabric. Limits on every field: "
            + ", ".join(f"{k} {v}" for k, v in LIMITS.items()) + ".",
        },
        "paths": PATHS,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key (`tierflow keys new`); optional when the router has an open tenant."}},
        },
        "security": [{}, {"bearer": []}],
    }


_cached: bytes | None = None


def openapi_json() -> bytes:
    """The document encoded once."""
    global _cached
    if _cached is None:
        _cached = msgspec.json.encode(openapi_document())
    return _cached
