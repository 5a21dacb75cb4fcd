"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models.

Streaming answers wait for the first token before sending headers, so every failure
that happens before any output (unknown model, no capacity, all nodes failed) gets its
real HTTP status; a failure after the first token arrives as an SSE `error` event,
which the official client raises as an APIError instead of hanging.

Per-token work is kept small: the JSON around a streamed token is built once per request
(`_ChunkFormat`), and only the token text is encoded per chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tierflow.contracts import messages
from tierflow.runtime.clock import Clock
from tierflow.runtime.errors import InvalidRequest, ModelNotFound, TierflowError
from tierflow.services.router.auth import bearer_token
from tierflow.services.router.dispatch import Dispatcher, GenerateParams, RequestRecord, finish_record
from tierflow.services.router.http_server import Request, Response, StreamingResponse
from tierflow.services.router.encoders_api import EncodersApi
from tierflow.services.router.metrics import RouterMetrics
from tierflow.services.router.openai_errors import client_timeout, decode_body, error_response, sse_error
from tierflow.services.router.openai_schema import ChatCompletionRequest, CompletionRequest, chat_decoder, check_limits, check_supported, completion_decoder
from tierflow.services.router.structured_output import OutputPlan, chat_logprobs, check_schemas, completion_logprobs, plan
from tierflow.services.router.openapi import openapi_json
from tierflow.placement.tables import ModelTable, NodeTable
from tierflow.placement import Tenant
from tierflow.tokenizer import render_chat

__all__ = ["OpenAIApi"]

log = logging.getLogger(__name__)
_encode = msgspec.json.encode
_DONE = b"data: [DONE]\n\n"


def _record_headers(record: RequestRecord) -> tuple[tuple[str, str], ...]:
    """Where the request ran, for clients and load generators: node, model version, tier;
    and the agent-loop policy's warning when the session is over a limit."""
    headers = (
        ("x-request-id", record.request_id),
        ("x-tierflow-node", record.node),
        ("x-tierflow-model-version", record.version),
        ("x-tierflow-tier", record.tier),
        ("x-tierflow-attempts", str(len(record.nodes_tried))),
        ("x-tierflow-placement", record.placement),
    )
    if record.agent_loop:
        return (*headers, ("x-tierflow-agent-loop", record.agent_loop))
    return headers


class _ChunkFormat:
    """Pre-rendered JSON around a streamed chunk: only the text is encoded per token."""

    __slots__ = ("_head", "_tail", "_usage_field")

    def __init__(self, obj: str, request_id: str, created: int, model: str, chat: bool, include_usage: bool, fingerprint: str) -> None:
        self._usage_field = include_usage
        prefix = (f'data: {{"id":"{request_id}","object":"{obj}","created":{created},"model":{_encode(model).decode()},'
                  f'"system_fingerprint":{_encode(fingerprint).decode()},"choices":[{{"index":0,')  # fmt: skip
        self._head = (prefix + ('"delta":{"content":' if chat else '"text":')).encode()
        self._tail = (('},' if chat else ',') + '"logprobs":null,"finish_reason":null}]' + (',"usage":null' if include_usage else "") + "}\n\n").encode()

    def text(self, text: str) -> bytes:
        return self._head + _encode(text) + self._tail


# The unstreamed answer as Structs: one msgspec encode, no dicts built per request (issue 16).
# Field order is the JSON's (as OpenAI sends it); None fields are encoded as null.
class _Cached(msgspec.Struct, gc=False):
    cached_tokens: int


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: _Cached


class _Message(msgspec.Struct, gc=False):
    role: str
    content: str


class _ChatChoice(msgspec.Struct, gc=False):
    index: int
    message: _Message
    logprobs: None
    finish_reason: str


class _TextChoice(msgspec.Struct, gc=False):
    index: int
    text: str
    logprobs: None
    finish_reason: str


class _Completion(msgspec.Struct, gc=False):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: tuple[_ChatChoice, ...]
    usage: _Usage


class _TextCompletion(msgspec.Struct, gc=False):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: tuple[_TextChoice, ...]
    usage: _Usage


class OpenAIApi:
    def __init__(
        self, dispatcher: Dispatcher, models: ModelTable, nodes: NodeTable, clock: Clock, metrics: RouterMetrics,
        registry: CollectorRegistry, *, nats_connected: Any,
    ) -> None:
        self._dispatcher = dispatcher
        self._models = models
        self._nodes = nodes
        self._clock = clock
        self._metrics = metrics
        self._registry = registry
        self._nats_connected = nats_connected  # () -> bool
        # Request ids: this process's random prefix and a counter (unique across routers,
        # and far cheaper per request than uuid4).
        prefix = uuid.uuid4().hex[:12]
        counter = itertools.count(1)
        self._ids = lambda: f"{prefix}{next(counter):x}"
        self._routes = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._list_models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._prometheus,
            ("GET", "/openapi.json"): self._openapi,
        }
        self._routes.update(EncodersApi(dispatcher, clock, metrics, self._ids).routes)  # /v1/embeddings, /v1/rerank

    @property
    def paths(self) -> frozenset[str]:
        """Every path answered (`/v1/models/{model}` for the model pages): what
        `/openapi.json` must document."""
        return frozenset(path for _, path in self._routes) | {"/v1/models/{model}"}

    # Routes that need a tenant: their key is checked when the head is in, before the body.
    _AUTHENTICATED = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/rerank")})

    def authorize(self, method: str, path: str, headers: dict[str, str]) -> object:
        """`http_server.serve(authorize=...)`: the tenant of a generation request, or its 401
        before any of its body is read or decoded; None for routes without a tenant. The
        model list needs a key too (as OpenAI's does): what is deployed is not public."""
        if path == "/v1/models" or path.startswith("/v1/models/"):
            try:
                self._dispatcher.authenticate(bearer_token(headers.get("authorization")))
            except TierflowError as exc:
                return error_response(exc)
            return None
        if (method, path) not in self._AUTHENTICATED:
            return None
        try:
            return self._dispatcher.authenticate(bearer_token(headers.get("authorization")))
        except TierflowError as exc:
            chat = path == "/v1/chat/completions"
            record = RequestRecord(request_id=f"{'chatcmpl' if chat else 'cmpl'}-{self._ids()}", api="chat" if chat else "completions", arrived=self._clock.monotonic())
            record.failed(exc)
            finish_record(record, self._metrics, self._clock)  # counted and logged like any refusal
            return error_response(exc)

    async def handle(self, request: Request) -> Response | StreamingResponse:
        route = self._routes.get((request.method, request.path))
        if route is not None:
            return await route(request)
        if request.method == "GET" and request.path.startswith("/v1/models/"):
            return self._get_model(request.path[len("/v1/models/"):])
        if any(path == request.path for _, path in self._routes):
            allowed = ", ".join(m for m, p in self._routes if p == request.path)
            return error_response(_MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}"))
        return error_response(_NotFound(f"no route {request.method} {request.path}; the API is under /v1 (chat/completions, completions, models)"))

    # ----------------------------------------------------------------- generation

    async def _chat(self, request: Request) -> Response | StreamingResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: Request) -> Response | StreamingResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, *, chat: bool) -> Response | StreamingResponse:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{self._ids()}"
        record = RequestRecord(request_id=request_id, api="chat" if chat else "completions", arrived=self._clock.monotonic())
        tenant: Tenant | None = None
        try:
            tenant = request.auth if isinstance(request.auth, Tenant) else self._dispatcher.authenticate(bearer_token(request.headers.get("authorization")))
            body = self._parse(request.body, chat)
            record.stream = body.stream
            params = await self._params(body, request_id, chat, request, tenant)
            logprobs = body.logprobs if chat else body.logprobs is not None
            if body.n > 1 or logprobs or (chat and (body.tools or body.response_format is not None)):
                return self._limits(await self._generate_choices(body, params, record, chat), tenant)
            events = self._dispatcher.generate(params, record)
            self._metrics.in_flight.inc()
            if body.stream:
                return self._limits(await self._stream(events, body, record, chat), tenant)
            return self._limits(await self._complete(events, body, record, chat), tenant)
        except TierflowError as exc:
            record.failed(exc)
            finish_record(record, self._metrics, self._clock)
            return self._limits(error_response(exc), tenant)

    def _limits(self, response: Response | StreamingResponse, tenant: Tenant | None) -> Response | StreamingResponse:
        """OpenAI's x-ratelimit-* headers, for a tenant with a rate limit or a token quota
        (`Tenant.ratelimit_headers`: a few numbers, read once per response). A streamed
        answer's are as of its first token, while its own reservation is still held."""
        if tenant is not None and (tenant.limiter is not None or tenant.quota is not None):
            response.headers = (*response.headers, *tenant.ratelimit_headers(self._clock.now()))
        return response

    def _parse(self, raw: bytes, chat: bool) -> ChatCompletionRequest | CompletionRequest:
        body = decode_body(raw, chat_decoder if chat else completion_decoder)
        too_deep = check_limits(body) or check_supported(body)
        if too_deep is not None:
            raise InvalidRequest(too_deep[1], param=too_deep[0])
        if isinstance(body, ChatCompletionRequest):
            check_schemas(body)
        if body.stream_options is not None and not body.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        return body

    async def _params(self, body: ChatCompletionRequest | CompletionRequest, request_id: str, chat: bool, request: Request, tenant: Tenant) -> GenerateParams:
        tokenize = self._dispatcher.tokenize
        if isinstance(body, ChatCompletionRequest):
            prompt_ids = await tokenize(body.model, render_chat([(m.role, m.text()) for m in body.messages]), tenant)
            max_tokens = body.max_completion_tokens or body.max_tokens
        else:
            try:
                prompt = body.prompt_input()
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="prompt") from None
            prompt_ids = await tokenize(body.model, prompt, tenant) if isinstance(prompt, str) else prompt
            max_tokens = body.max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        workload = request.headers.get("x-tierflow-workload") or None
        if workload not in (None, "interactive", "batch"):
            raise InvalidRequest("x-tierflow-workload must be 'interactive' or 'batch'", param="x-tierflow-workload")
        header_class = request.headers.get("x-tierflow-class")
        request_class = tenant.request_class(header_class, param="x-tierflow-class") if header_class else tenant.request_class(body.service_tier)
        return GenerateParams(
            request_id=request_id, model=body.model, prompt_token_ids=prompt_ids, max_tokens=max_tokens,
            api="chat" if chat else "completions", seed=body.seed,
            temperature=body.temperature if body.temperature is not None else 1.0,
            ignore_eos=body.ignore_eos, stop=stop, session_header=request.headers.get("x-session-id", ""),
            user=body.user or "", workload=workload, timeout=client_timeout(request, body.stream), tenant=tenant,
            request_class=request_class,
        )

    def _usage(self, record: RequestRecord) -> dict[str, Any]:
        return {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": record.prefix_hit_tokens},
        }

    async def _complete(self, events: AsyncIterator[messages.Tokens | messages.Finished], body: Any, record: RequestRecord, chat: bool) -> Response:
        parts: list[str] = []
        try:
            async with aclosing(events):
                async for event in events:
                    if type(event) is messages.Tokens:
                        parts.append(event.text)
        except TierflowError as exc:
            record.failed(exc)
            return error_response(exc)
        except BaseException:
            record.cancelled()
            raise
        finally:
            self._metrics.in_flight.dec()
            finish_record(record, self._metrics, self._clock)
        text = "".join(parts)
        usage = _Usage(record.prompt_tokens, record.completion_tokens, record.prompt_tokens + record.completion_tokens, _Cached(record.prefix_hit_tokens))
        if chat:
            payload: _Completion | _TextCompletion = _Completion(
                record.request_id, "chat.completion", int(time.time()), body.model, f"tierflow-{record.version}",
                (_ChatChoice(0, _Message("assistant", text), None, record.finish_reason),), usage,
            )
        else:
            payload = _TextCompletion(
                record.request_id, "text_completion", int(time.time()), body.model, f"tierflow-{record.version}",
                (_TextChoice(0, text, None, record.finish_reason),), usage,
            )
        return Response(200, _encode(payload), headers=_record_headers(record))

    async def _stream(self, events: AsyncIterator[messages.Tokens | messages.Finished], body: Any, record: RequestRecord, chat: bool) -> Response | StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        created = int(time.time())
        # Wait for the first event before committing to a 200: errors before output keep their status.
        try:
            first = await anext(events)
        except TierflowError as exc:
            self._metrics.in_flight.dec()
            await events.aclose()
            record.failed(exc)
            finish_record(record, self._metrics, self._clock)
            return error_response(exc)
        except BaseException:
            self._metrics.in_flight.dec()
            await events.aclose()
            record.cancelled()
            finish_record(record, self._metrics, self._clock)
            raise

        fingerprint = f"tierflow-{record.version}"  # the version is known once a node answered
        fmt = _ChunkFormat("chat.completion.chunk" if chat else "text_completion", record.request_id, created, body.model, chat, include_usage, fingerprint)

        def frame(obj: dict[str, Any]) -> bytes:
            return b"data: " + _encode(obj) + b"\n\n"

        def final_chunk(finish_reason: str) -> bytes:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            if chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            obj: dict[str, Any] = {"id": record.request_id, "object": fmt_obj, "created": created, "model": body.model,
                                   "system_fingerprint": fingerprint, "choices": [choice]}  # fmt: skip
            if include_usage:
                obj["usage"] = None
            return frame(obj)

        fmt_obj = "chat.completion.chunk" if chat else "text_completion"

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async with aclosing(events):
                    if chat:
                        role: dict[str, Any] = {"id": record.request_id, "object": fmt_obj, "created": created, "model": body.model,
                                                "system_fingerprint": fingerprint, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
                        if include_usage:
                            role["usage"] = None
                        yield frame(role)
                    event: messages.Tokens | messages.Finished = first
                    while True:
                        if type(event) is messages.Tokens:
                            yield fmt.text(event.text)
                        else:
                            yield final_chunk(record.finish_reason)
                            if include_usage:
                                yield frame({"id": record.request_id, "object": fmt_obj, "created": created, "model": body.model,
                                             "system_fingerprint": fingerprint, "choices": [], "usage": self._usage(record)})
                            yield _DONE
                            return
                        event = await anext(events)
            except TierflowError as exc:
                record.failed(exc)
                yield sse_error(exc)
            except BaseException:
                record.cancelled()
                raise
            finally:
                self._metrics.in_flight.dec()
                finish_record(record, self._metrics, self._clock)

        headers = (("cache-control", "no-cache"), *_record_headers(record))
        return StreamingResponse(200, chunks(), headers=headers)

    # ----------------------------------------------------------------- rich answers

    async def _generate_choices(self, body: Any, params: GenerateParams, record: RequestRecord, chat: bool) -> Response | StreamingResponse:
        """`n` choices, tool calls, JSON a schema asks for, log-probabilities: each choice a
        generation of its own (seed + index; choice i > 0 logged as `<id>-i`), planned by
        structured_output.plan. Unstreamed, the choices run at once; streamed, one after
        the other (each choice's chunks carry its index, as clients expect either way)."""
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        params.seed = seed
        plans = [plan(body, seed, i) if chat else OutputPlan() for i in range(body.n)]
        choices: list[_Choice] = []
        for i, p in enumerate(plans):
            rec = record if i == 0 else RequestRecord(request_id=f"{record.request_id}-{i}", api=record.api, arrived=record.arrived, stream=body.stream)
            cp = replace(params, request_id=rec.request_id, seed=seed + i, output_token_ids=p.token_ids)
            choices.append(_Choice(i, p, rec, seed + i, self._dispatcher.generate(cp, rec)))
        self._metrics.in_flight.inc()
        if body.stream:
            return await self._stream_choices(body, choices, chat)
        return await self._complete_choices(body, choices, chat)

    async def _run_choice(self, c: _Choice) -> None:
        try:
            async with aclosing(c.events):
                async for event in c.events:
                    if type(event) is messages.Tokens:
                        c.texts.append(event.text)
                        c.ids.extend(event.token_ids)
        except TierflowError as exc:
            c.record.failed(exc)
            raise
        except BaseException:
            c.record.cancelled()
            raise
        finally:
            finish_record(c.record, self._metrics, self._clock)

    def _choices_usage(self, choices: list[_Choice]) -> dict[str, Any]:
        first = choices[0].record
        completion = sum(c.record.completion_tokens for c in choices)
        return {
            "prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.prefix_hit_tokens},
        }

    async def _complete_choices(self, body: Any, choices: list[_Choice], chat: bool) -> Response:
        tasks = [asyncio.ensure_future(self._run_choice(c)) for c in choices]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            self._metrics.in_flight.dec()
        for task in tasks:
            exc = task.exception() if not task.cancelled() else None
            if isinstance(exc, TierflowError):
                return error_response(exc)
            if exc is not None:
                raise exc
        out = []
        for c in choices:
            text = "".join(c.texts)
            finish = c.record.finish_reason
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if c.plan.kind == "tool":
                    message = {"role": "assistant", "content": None, "tool_calls": [
                        {"id": c.plan.call_id, "type": "function", "function": {"name": c.plan.tool, "arguments": text}}]}
                    finish = "tool_calls" if finish == "stop" else finish
                logprobs = {"content": chat_logprobs(c.ids, 0, c.seed, body.top_logprobs or 0), "refusal": None} if body.logprobs else None
                out.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                logprobs = completion_logprobs(c.ids, 0, 0, c.seed, body.logprobs) if body.logprobs is not None else None
                out.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        record = choices[0].record
        payload = {
            "id": record.request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": f"tierflow-{record.version}", "choices": out, "usage": self._choices_usage(choices),
        }
        return Response(200, _encode(payload), headers=_record_headers(record))

    async def _stream_choices(self, body: Any, choices: list[_Choice], chat: bool) -> Response | StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        record = choices[0].record
        head = choices[0]
        try:
            first = await anext(head.events)
        except TierflowError as exc:
            self._metrics.in_flight.dec()
            await head.events.aclose()
            record.failed(exc)
            finish_record(record, self._metrics, self._clock)
            return error_response(exc)
        except BaseException:
            self._metrics.in_flight.dec()
            await head.events.aclose()
            record.cancelled()
            finish_record(record, self._metrics, self._clock)
            raise
        top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)

        def frame(choice: dict[str, Any] | None, usage: bool = False) -> bytes:
            chunk: dict[str, Any] = {"id": record.request_id, "object": obj, "created": created, "model": body.model,
                                     "system_fingerprint": f"tierflow-{record.version}", "choices": [choice] if choice else []}
            if include_usage:
                chunk["usage"] = self._choices_usage(choices) if usage else None
            return b"data: " + _encode(chunk) + b"\n\n"

        def opening(c: _Choice) -> bytes:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
            if c.plan.kind == "tool":
                delta = {"role": "assistant", "content": None, "tool_calls": [
                    {"index": 0, "id": c.plan.call_id, "type": "function", "function": {"name": c.plan.tool, "arguments": ""}}]}
            return frame({"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None})

        def tokens(c: _Choice, event: messages.Tokens) -> bytes:
            start = len(c.ids)
            c.ids.extend(event.token_ids)
            if chat:
                delta: dict[str, Any] = {"content": event.text}
                if c.plan.kind == "tool":
                    delta = {"tool_calls": [{"index": 0, "function": {"arguments": event.text}}]}
                logprobs = {"content": chat_logprobs(event.token_ids, start, c.seed, top), "refusal": None} if body.logprobs else None
                return frame({"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": None})
            logprobs = completion_logprobs(event.token_ids, start, c.offset, c.seed, top) if body.logprobs is not None else None
            c.offset += len(event.text)
            return frame({"index": c.index, "text": event.text, "logprobs": logprobs, "finish_reason": None})

        def closing(c: _Choice) -> bytes:
            finish = c.record.finish_reason
            if c.plan.kind == "tool" and finish == "stop":
                finish = "tool_calls"
            choice: dict[str, Any] = {"index": c.index, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            return frame(choice)

        async def chunks() -> AsyncIterator[bytes]:
            current = head
            try:
                for c in choices:
                    current = c
                    async with aclosing(c.events):
                        event: messages.Tokens | messages.Finished = first if c is head else await anext(c.events)
                        if chat:
                            yield opening(c)
                        while True:
                            if type(event) is messages.Tokens:
                                yield tokens(c, event)
                            else:
                                yield closing(c)
                                break
                            event = await anext(c.events)
                    if c is not head:
                        finish_record(c.record, self._metrics, self._clock)
                if include_usage:
                    yield frame(None, usage=True)
                yield _DONE
            except TierflowError as exc:
                current.record.failed(exc)
                if current is not head:
                    finish_record(current.record, self._metrics, self._clock)
                yield sse_error(exc)
            except BaseException:
                current.record.cancelled()
                if current is not head:
                    finish_record(current.record, self._metrics, self._clock)
                raise
            finally:
                self._metrics.in_flight.dec()
                finish_record(record, self._metrics, self._clock)

        headers = (("cache-control", "no-cache"), *_record_headers(record))
        return StreamingResponse(200, chunks(), headers=headers)

    # ----------------------------------------------------------------- catalog & ops

    def _model_obj(self, name: str) -> dict[str, Any]:
        route = self._models.routes[name]
        return {"id": name, "object": "model", "created": int(route.created_at), "owned_by": "tierflow", "max_model_len": route.max_context}

    async def _list_models(self, request: Request) -> Response:
        data = [self._model_obj(name) for name in sorted(self._models.routes)]
        return Response(200, _encode({"object": "list", "data": data}))

    def _get_model(self, name: str) -> Response:
        if name not in self._models.routes:
            return error_response(ModelNotFound(f"The model `{name}` does not exist or is not deployed.", param="model", code="model_not_found"))
        return Response(200, _encode(self._model_obj(name)))

    async def _health(self, request: Request) -> Response:
        now = self._clock.monotonic()
        live = self._nodes.live(now)
        connected = bool(self._nats_connected())
        ok = connected and bool(live)
        body = {
            "status": "ok" if ok else "unavailable",
            "nats": "connected" if connected else "disconnected",
            "nodes": len(live),
            "models": len(self._models.routes),
        }
        return Response(200 if ok else 503, _encode(body))

    async def _prometheus(self, request: Request) -> Response:
        return Response(200, generate_latest(self._registry), content_type=CONTENT_TYPE_LATEST)

    async def _openapi(self, request: Request) -> Response:
        return Response(200, openapi_json())


@dataclass(slots=True, eq=False)
class _Choice:
    """One choice of a rich answer: its plan, record, seed and stream, and what came."""

    index: int
    plan: OutputPlan
    record: RequestRecord
    seed: int
    events: AsyncIterator[messages.Tokens | messages.Finished]
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    offset: int = 0  # text offset of the next token (legacy completions' logprobs)


class _NotFound(TierflowError):
    http_status = 404
    error_type = "invalid_request_error"


class _MethodNotAllowed(TierflowError):
    http_status = 405
    error_type = "invalid_request_error"
