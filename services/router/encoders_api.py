"""Embeddings and reranking: `POST /v1/embeddings` (OpenAI's shape) and `POST /v1/rerank`
(the shape Cohere, Jina and vLLM share), and the core the gRPC Embed/Rerank calls use.

Each input (each query/document pair for a reranker) is one request through the fabric's
usual path (`Dispatcher.generate`: the model's route, the tenant's admission, placement by
hotness and load, retries on another node): a prefill-only request (max_tokens 0) that the
node's engine runs as one forward pass, batched with whatever else arrived, taking its
turn on the chip beside the chat models of its bundle and loading its weights when they
are cold. Sending them one by one is what lets the engine batch a client's inputs into one
pass (their sum bounded by its prefill budget, not by the model's 512-token context).

The numbers themselves are a pure function of model and tokens (tierflow.rdu.encoders), so
the router computes them once the node has done the pass: no vector crosses NATS, and a
retried or re-placed input gets the same vector, as structured output is planned by the
router and only timed by the node.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from msgspec import Meta, Struct

from tierflow.contracts import messages
from tierflow.placement import Tenant
from tierflow.rdu.encoders import embed_many, rerank_scores, to_base64, truncate
from tierflow.runtime.clock import Clock
from tierflow.runtime.errors import InvalidRequest, TierflowError
from tierflow.services.router.auth import bearer_token
from tierflow.services.router.dispatch import Dispatcher, GenerateParams, RequestRecord, finish_record
from tierflow.services.router.http_server import Request, Response
from tierflow.services.router.metrics import RouterMetrics
from tierflow.services.router.openai_errors import client_timeout, decode_body, error_response, invalid_body

__all__ = ["EncodersApi", "Encoders", "Embedded", "Ranked", "MAX_INPUTS", "MAX_DOCUMENTS"]

MAX_INPUTS = 2048  # OpenAI's limit on one embeddings request
MAX_DOCUMENTS = 1000  # Cohere's recommended maximum per rerank call
MAX_INPUT_CHARS = 1 << 20  # one input's text (its tokens are bounded by the model's context)
_PASSES_AT_ONCE = 64  # one request's inputs in flight at once (the rest queue here, not on a node)
_TOKEN_ID_LIMIT = 1 << 31


_Name = Annotated[str, Meta(max_length=256)]
_User = Annotated[str, Meta(max_length=256)]


class EmbeddingsBody(Struct, forbid_unknown_fields=True):
    """OpenAI's embeddings request; an unknown field is a 400 naming it."""

    model: _Name
    # Checked by `_inputs`: four shapes no one msgspec type expresses; documented here.
    input: Annotated[Any, Meta(extra_json_schema={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_INPUTS},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}, "minItems": 1, "maxItems": MAX_INPUTS},
    ]})]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: _User | None = None


class _Doc(Struct, forbid_unknown_fields=True):
    text: str


class RerankBody(Struct, forbid_unknown_fields=True):
    """The rerank request Cohere, Jina and vLLM share (documents as strings or {text})."""

    model: _Name
    query: str
    documents: Annotated[list[str | _Doc], Meta(max_length=MAX_DOCUMENTS)]
    top_n: Annotated[int, Meta(ge=0)] | None = None  # 0 or absent: every document
    return_documents: bool = True
    user: _User | None = None


_embeddings_decoder = msgspec.json.Decoder(EmbeddingsBody)
_rerank_decoder = msgspec.json.Decoder(RerankBody)
_encode = msgspec.json.encode


@dataclass(slots=True)
class Embedded:
    """One embeddings request's answer: a row per input, and the tokens it read."""

    vectors: np.ndarray
    prompt_tokens: int
    records: list[RequestRecord] = field(default_factory=list)


@dataclass(slots=True)
class Ranked:
    """One rerank request's answer: (index, score) best first, and the tokens it read."""

    results: list[tuple[int, float]]
    prompt_tokens: int
    records: list[RequestRecord] = field(default_factory=list)


class Encoders:
    """The protocol-free core both front doors call."""

    def __init__(self, dispatcher: Dispatcher, clock: Clock, metrics: RouterMetrics) -> None:
        self._dispatcher = dispatcher
        self._clock = clock
        self._metrics = metrics

    async def _token_ids(self, model: str, item: str | list[int], tenant: Tenant | None, param: str) -> list[int]:
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"'{param}' is an empty string; every input must have at least one token", param=param)
            try:
                return await self._dispatcher.tokenize(model, item, tenant)
            except InvalidRequest as exc:  # too long for the model: name this input, not `messages`
                raise InvalidRequest(exc.message, param=param, code=exc.code) from None
        if not item:
            raise InvalidRequest(f"'{param}' is an empty list of token ids", param=param)
        return item

    async def _passes(self, model: str, prompts: Sequence[list[int]], api: str, request_id: str, tenant: Tenant | None,
                      timeout: float | None, workload: str | None) -> list[RequestRecord]:
        """One prefill-only request per prompt through the fabric; every record, in order.
        The first failure fails the request (the other passes are cancelled)."""
        gate = asyncio.Semaphore(_PASSES_AT_ONCE)
        records: list[RequestRecord] = []

        async def one(i: int, ids: list[int]) -> None:
            async with gate:
                rid = f"{request_id}-{i}" if len(prompts) > 1 else request_id
                record = RequestRecord(request_id=rid, api=api, arrived=self._clock.monotonic())
                records.append(record)
                params = GenerateParams(request_id=rid, model=model, prompt_token_ids=ids, max_tokens=0, api=api,
                                        tenant=tenant, timeout=timeout, workload=workload)
                try:
                    async for event in self._dispatcher.generate(params, record):
                        if type(event) is messages.Finished:
                            break
                except TierflowError as exc:
                    record.failed(exc)
                    raise
                except BaseException:
                    record.cancelled()
                    raise
                finally:
                    finish_record(record, self._metrics, self._clock)

        tasks = [asyncio.ensure_future(one(i, ids)) for i, ids in enumerate(prompts)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return records

    async def embed(self, model: str, inputs: Sequence[str | list[int]], *, dimensions: int | None, tenant: Tenant | None,
                    request_id: str, timeout: float | None = None, workload: str | None = None) -> Embedded:
        route = self._dispatcher.resolve(model, tenant)
        if route.kind != "embed":
            self._dispatcher_kind_error(model, route.kind)
        full = route.embedding_dims
        dims = full if dimensions is None else dimensions
        if dims != full:
            if not route.matryoshka_dims:
                raise InvalidRequest(f"The model `{model}` does not support `dimensions` other than its {full}", param="dimensions")
            if not 1 <= dims <= full:
                raise InvalidRequest(f"`dimensions` must be between 1 and {full} for `{model}`, got {dims}", param="dimensions")
        if not inputs:
            raise InvalidRequest("'input' is empty; send at least one input", param="input")
        prompts = [await self._token_ids(model, item, tenant, f"input[{i}]" if len(inputs) > 1 else "input") for i, item in enumerate(inputs)]
        records = await self._passes(model, prompts, "embeddings", request_id, tenant, timeout, workload)
        vectors = embed_many(model, prompts, full)
        if dims != full:
            vectors = truncate(vectors, dims)
        return Embedded(vectors, sum(len(p) for p in prompts), records)

    async def rerank(self, model: str, query: str, documents: Sequence[str], *, top_n: int | None, tenant: Tenant | None,
                     request_id: str, timeout: float | None = None, workload: str | None = None) -> Ranked:
        route = self._dispatcher.resolve(model, tenant)
        if route.kind != "rerank":
            self._dispatcher_kind_error(model, route.kind)
        if not documents:
            raise InvalidRequest("'documents' is empty; send at least one document", param="documents")
        if top_n is not None and top_n < 0:
            raise InvalidRequest(f"'top_n' must be >= 0 (0: every document), got {top_n}", param="top_n")
        q = await self._token_ids(model, query, tenant, "query")
        docs = [await self._token_ids(model, d, tenant, f"documents[{i}]") for i, d in enumerate(documents)]
        # A cross-encoder reads query and document together: one pass per pair.
        pairs = [q + d for d in docs]
        for i, p in enumerate(pairs):
            if len(p) > route.max_context:
                raise InvalidRequest(
                    f"This model's maximum context length is {route.max_context} tokens. However, the query with documents[{i}] "
                    f"has {len(p)} tokens. Please shorten the query or the document.", param=f"documents[{i}]", code="context_length_exceeded",
                )
        records = await self._passes(model, pairs, "rerank", request_id, tenant, timeout, workload)
        scores = rerank_scores(model, q, docs)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        if top_n:
            order = order[:top_n]
        return Ranked([(i, scores[i]) for i in order], sum(len(p) for p in pairs), records)

    @staticmethod
    def _dispatcher_kind_error(model: str, kind: str) -> None:
        where = {"generate": "/v1/chat/completions or /v1/completions", "embed": "/v1/embeddings", "rerank": "/v1/rerank"}.get(kind, "its own endpoint")
        raise InvalidRequest(f"The model `{model}` is a {kind} model; use {where}", param="model", code="wrong_model_kind")


def _inputs(raw: Any) -> list[str | list[int]]:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of
    lists of token ids; anything else is a 400 naming the part that is wrong."""
    if isinstance(raw, str):
        if len(raw) > MAX_INPUT_CHARS:
            raise InvalidRequest(f"'input' is longer than {MAX_INPUT_CHARS} characters", param="input")
        return [raw]
    if raw is None:
        raise InvalidRequest("'input' is a required property", param="input")
    if not isinstance(raw, list):
        raise InvalidRequest("'input' must be a string, a list of strings, a list of token ids or a list of lists of token ids", param="input")
    if not raw:
        raise InvalidRequest("'input' is empty; send at least one input", param="input")
    if len(raw) > MAX_INPUTS:
        raise InvalidRequest(f"'input' has {len(raw)} items; at most {MAX_INPUTS}", param="input")
    if all(type(x) is int for x in raw):
        _check_ids(raw, "input")
        return [raw]
    out: list[str | list[int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if len(item) > MAX_INPUT_CHARS:
                raise InvalidRequest(f"'input[{i}]' is longer than {MAX_INPUT_CHARS} characters", param=f"input[{i}]")
            out.append(item)
        elif isinstance(item, list) and all(type(x) is int for x in item):
            _check_ids(item, f"input[{i}]")
            out.append(item)
        else:
            raise InvalidRequest(f"'input[{i}]' must be a string or a list of token ids (and all items of one kind)", param=f"input[{i}]")
    return out


def _check_ids(ids: list[int], param: str) -> None:
    for j, t in enumerate(ids):
        if not 0 <= t < _TOKEN_ID_LIMIT:
            raise InvalidRequest(f"'{param}[{j}]' is not a token id (0 <= id < 2**31), got {t}", param=f"{param}[{j}]")


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


def _invalid(exc: msgspec.MsgspecError) -> InvalidRequest:
    unknown = _UNKNOWN_FIELD.search(str(exc))
    if unknown:  # a field this endpoint does not take: refused, never silently dropped
        return InvalidRequest(f"Unrecognized request argument supplied: {unknown.group(1)}", param=unknown.group(1))
    return invalid_body(exc)


class EncodersApi:
    """The two HTTP routes; `routes` is what openai_api registers."""

    def __init__(self, dispatcher: Dispatcher, clock: Clock, metrics: RouterMetrics, ids: Callable[[], str]) -> None:
        self._dispatcher = dispatcher
        self._core = Encoders(dispatcher, clock, metrics)
        self._clock = clock
        self._metrics = metrics
        self._ids = ids
        self.routes = {("POST", "/v1/embeddings"): self._embeddings, ("POST", "/v1/rerank"): self._rerank}

    def _tenant(self, request: Request) -> Tenant:
        if isinstance(request.auth, Tenant):
            return request.auth
        return self._dispatcher.authenticate(bearer_token(request.headers.get("authorization")))

    def _refused(self, request_id: str, api: str, exc: TierflowError) -> Response:
        record = RequestRecord(request_id=request_id, api=api, arrived=self._clock.monotonic())
        record.failed(exc)
        finish_record(record, self._metrics, self._clock)  # counted and logged like any refusal
        return error_response(exc)

    @staticmethod
    def _headers(request_id: str, records: list[RequestRecord]) -> tuple[tuple[str, str], ...]:
        nodes = sorted({r.node for r in records if r.node})
        return (("x-request-id", request_id), ("x-tierflow-node", ",".join(nodes)),
                ("x-tierflow-model-version", records[0].version if records else ""))

    async def _embeddings(self, request: Request) -> Response:
        request_id = f"embd-{self._ids()}"
        try:
            tenant = self._tenant(request)
            body = decode_body(request.body, _embeddings_decoder, _invalid)
            inputs = _inputs(body.input)
            done = await self._core.embed(body.model, inputs, dimensions=body.dimensions, tenant=tenant, request_id=request_id,
                                          timeout=client_timeout(request, False), workload=_workload(request))
        except TierflowError as exc:
            return self._refused(request_id, "embeddings", exc)
        if body.encoding_format == "base64":
            data = [{"object": "embedding", "index": i, "embedding": to_base64(v)} for i, v in enumerate(done.vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(done.vectors)]
        payload = {"object": "list", "data": data, "model": body.model,
                   "usage": {"prompt_tokens": done.prompt_tokens, "total_tokens": done.prompt_tokens}}
        return Response(200, _encode(payload), headers=self._headers(request_id, done.records))

    async def _rerank(self, request: Request) -> Response:
        request_id = f"rerank-{self._ids()}"
        try:
            tenant = self._tenant(request)
            body = decode_body(request.body, _rerank_decoder, _invalid)
            texts = [d if isinstance(d, str) else d.text for d in body.documents]
            for i, t in enumerate([body.query, *texts]):
                if len(t) > MAX_INPUT_CHARS:
                    param = "query" if i == 0 else f"documents[{i - 1}]"
                    raise InvalidRequest(f"'{param}' is longer than {MAX_INPUT_CHARS} characters", param=param)
            done = await self._core.rerank(body.model, body.query, texts, top_n=body.top_n, tenant=tenant, request_id=request_id,
                                           timeout=client_timeout(request, False), workload=_workload(request))
        except TierflowError as exc:
            return self._refused(request_id, "rerank", exc)
        results = []
        for index, score in done.results:
            item: dict[str, Any] = {"index": index, "relevance_score": score}
            if body.return_documents:
                item["document"] = {"text": texts[index]}
            results.append(item)
        payload = {"id": request_id, "object": "rerank", "model": body.model, "created": int(time.time()), "results": results,
                   "usage": {"prompt_tokens": done.prompt_tokens, "total_tokens": done.prompt_tokens}}
        return Response(200, _encode(payload), headers=self._headers(request_id, done.records))


def _workload(request: Request) -> str | None:
    workload = request.headers.get("x-tierflow-workload") or None
    if workload not in (None, "interactive", "batch"):
        raise InvalidRequest("x-tierflow-workload must be 'interactive' or 'batch'", param="x-tierflow-workload")
    return workload
