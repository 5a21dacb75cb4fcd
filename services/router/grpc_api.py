"""The gRPC front door: tierflow.v1.Inference, plus the standard health and reflection services.

Same request path as the HTTP API (the Dispatcher); errors map to gRPC status codes
the way the OpenAI surface maps them to HTTP statuses, and carry `google.rpc` details in
`grpc-status-details-bin` (what `grpc_status.rpc_status.from_call` decodes): an ErrorInfo
whose reason is the OpenAI error code (domain "tierflow", metadata type/param/http_status),
and a RetryInfo when trying again may succeed (429, 502, 503).

A call's `traceparent` metadata continues the caller's trace (as the HTTP header does);
the call's initial metadata carries `x-request-id`: the caller's own when it sent a valid
one (the HTTP server's rule), else the router's request id. A request's class (issue 21)
is its `x-tierflow-class` metadata, else its `service_tier` field, as HTTP's header and
body: the same names, the same 400/403 (INVALID_ARGUMENT/PERMISSION_DENIED). Health: see
runtime/grpc_server.
"""

from __future__ import annotations

import uuid
from typing import Any
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tierflow.contracts import messages
from tierflow.runtime.clock import Clock
from tierflow.runtime.errors import InvalidRequest, TierflowError
from tierflow.runtime.grpc_server import start_grpc_server
from tierflow.runtime.tracing import continue_trace, exporting, note_front_door
from tierflow.services.router.http_server import client_request_id
from tierflow.services.router.auth import bearer_token
from tierflow.services.router.dispatch import Dispatcher, GenerateParams, RequestRecord, finish_record
from tierflow.services.router.encoders_api import MAX_DOCUMENTS, MAX_INPUTS, Encoders
from tierflow.services.router.metrics import RouterMetrics
from tierflow.services.router.openai_schema import MAX_MESSAGES, MAX_NAME_CHARS, MAX_STOP, MAX_STOP_CHARS, MAX_USER_CHARS
from tierflow.services.router.structured_output import OutputPlan, grpc_plan
from tierflow.placement import Tenant
from tierflow.tokenizer import render_chat
from tierflow.v1 import inference_pb2 as pb
from tierflow.v1 import inference_pb2_grpc as pb_grpc

__all__ = ["start_grpc", "STATUS_BY_HTTP"]

STATUS_BY_HTTP = {
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _check_bounds(request: pb.GenerateRequest) -> None:
    """The HTTP API's limits (openai_schema) on the same fields: protobuf checks types
    only, and a temperature of NaN or -1 would reach the node."""
    if len(request.model) > MAX_NAME_CHARS:
        raise InvalidRequest(f"model is longer than {MAX_NAME_CHARS} characters", param="model")
    if len(request.session_id) > MAX_USER_CHARS or len(request.user) > MAX_USER_CHARS:
        raise InvalidRequest(f"session_id and user may have at most {MAX_USER_CHARS} characters", param="session_id")
    if request.HasField("temperature") and not 0.0 <= request.temperature <= 2.0:  # NaN fails too
        raise InvalidRequest(f"temperature must be between 0 and 2, got {request.temperature}", param="temperature")
    if request.WhichOneof("input") == "messages":
        chat = request.messages.messages
        if len(chat) > MAX_MESSAGES:
            raise InvalidRequest(f"at most {MAX_MESSAGES} messages", param="messages")
        for i, message in enumerate(chat):
            if len(message.role) > 64:
                raise InvalidRequest(f"messages[{i}].role is longer than 64 characters", param=f"messages[{i}].role")


_RETRYABLE_HTTP = frozenset({429, 502, 503})
ERROR_DOMAIN = "tierflow"


def error_status(exc: TierflowError) -> grpc.Status:
    """The gRPC status of a fabric error, with its ErrorInfo (and RetryInfo when a retry
    may succeed) as `google.rpc.Status` details."""
    code = STATUS_BY_HTTP.get(exc.http_status, grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(reason=exc.code or exc.error_type, domain=ERROR_DOMAIN, metadata={
        "type": exc.error_type, "http_status": str(exc.http_status), **({"param": exc.param} if exc.param else {}),
    })  # fmt: skip
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if exc.http_status in _RETRYABLE_HTTP or exc.retryable:
        delay = max(float(getattr(exc, "retry_after", 1.0)), 0.0)
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(delay), nanos=int((delay % 1) * 1e9)))
        details.append(any_pb2.Any())
        details[1].Pack(retry)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=exc.message, details=details)
    return rpc_status.to_status(status)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, dispatcher: Dispatcher, clock: Clock, metrics: RouterMetrics, address: tuple[str, int] = ("", 0)) -> None:
        self._dispatcher = dispatcher
        self._clock = clock
        self._metrics = metrics
        self._address = address  # server.address/server.port on the request's span
        self._encoders = Encoders(dispatcher, clock, metrics)  # Embed and Rerank (services/router/encoders_api.py)

    async def _params(self, request: pb.GenerateRequest, request_id: str, tenant: Tenant, timeout: float | None = None, asked_class: str = "") -> GenerateParams:
        if not request.model:
            raise InvalidRequest("model is required", param="model")
        _check_bounds(request)
        # The class first (a 400/403 before any tokenizing): the metadata's, else the field's, as HTTP's header and body.
        request_class = tenant.request_class(asked_class, param="x-tierflow-class") if asked_class else tenant.request_class(request.service_tier)
        which = request.WhichOneof("input")
        if which == "prompt":
            prompt_ids = await self._dispatcher.tokenize(request.model, request.prompt, tenant)
        elif which == "messages":
            if not request.messages.messages:
                raise InvalidRequest("messages must not be empty", param="messages")
            prompt_ids = await self._dispatcher.tokenize(request.model, render_chat([(m.role, m.content) for m in request.messages.messages]), tenant)
        else:
            raise InvalidRequest("set either prompt or messages", param="input")
        return GenerateParams(
            request_id=request_id, model=request.model, prompt_token_ids=prompt_ids,
            max_tokens=request.max_tokens or None, api="grpc",
            seed=request.seed if request.HasField("seed") else None,
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            ignore_eos=request.ignore_eos, session_header=request.session_id, user=request.user, timeout=timeout, tenant=tenant,
            stop=list(request.stop), request_class=request_class,
        )

    async def _events(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[tuple[messages.Tokens | messages.Finished, RequestRecord, OutputPlan]]:
        request_id = f"gen-{uuid.uuid4().hex}"
        record = RequestRecord(request_id=request_id, api="grpc", arrived=self._clock.monotonic(), stream=True)
        self._metrics.in_flight.inc()
        try:
            metadata = dict(context.invocation_metadata() or ())
            echo = client_request_id(metadata) if "x-request-id" in metadata else None
            await context.send_initial_metadata((("x-request-id", echo or request_id),))
            continue_trace(metadata)  # this RPC's task: the caller's trace context becomes current
            if exporting():
                note_front_door(*self._address, echo or "")
            tenant = self._dispatcher.authenticate(bearer_token(metadata.get("authorization")))
            remaining = context.time_remaining()  # the client's gRPC deadline, None without one
            params = await self._params(request, request_id, tenant, remaining if remaining is not None and remaining > 0 else None, metadata.get("x-tierflow-class", ""))
            if len(request.stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in request.stop):
                raise InvalidRequest(f"at most {MAX_STOP} stop strings of {MAX_STOP_CHARS} characters", param="stop")
            plan = grpc_plan(request, params)  # tools / response_format: sets params' seed and planned tokens
            events = self._dispatcher.generate(params, record)
            async with aclosing(events):
                async for event in events:
                    yield event, record, plan
        except TierflowError as exc:
            record.failed(exc)
            status = error_status(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except BaseException:
            record.cancelled()
            raise
        finally:
            self._metrics.in_flight.dec()
            finish_record(record, self._metrics, self._clock)

    @staticmethod
    def _usage(record: RequestRecord) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            total_tokens=record.prompt_tokens + record.completion_tokens, cached_tokens=record.prefix_hit_tokens,
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        arguments: list[str] = []
        async for event, record, plan in self._events(request, context):
            if type(event) is messages.Tokens:
                if plan.kind == "tool":
                    arguments.append(event.text)
                yield pb.GenerateResponse(id=record.request_id, model=record.model, text=event.text, token_ids=event.token_ids, node_id=record.node, model_version=record.version)
            else:
                call = pb.ToolCall(id=plan.call_id, name=plan.tool, arguments="".join(arguments)) if plan.kind == "tool" else None
                finish = "tool_calls" if call is not None and event.finish_reason == "stop" else event.finish_reason
                yield pb.GenerateResponse(id=record.request_id, model=record.model, finish_reason=finish, usage=self._usage(record), node_id=record.node, model_version=record.version, tool_call=call)

    async def GenerateUnary(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        texts: list[str] = []
        ids: list[int] = []
        final: RequestRecord | None = None
        finish = ""
        plan = OutputPlan()
        async for event, record, plan in self._events(request, context):
            final = record
            if type(event) is messages.Tokens:
                texts.append(event.text)
                ids.extend(event.token_ids)
            else:
                finish = event.finish_reason
        assert final is not None  # _events yields Finished or aborts
        call = pb.ToolCall(id=plan.call_id, name=plan.tool, arguments="".join(texts)) if plan.kind == "tool" else None
        finish = "tool_calls" if call is not None and finish == "stop" else finish
        return pb.GenerateResponse(id=final.request_id, model=final.model, text="".join(texts), token_ids=ids, finish_reason=finish, usage=self._usage(final), node_id=final.node, model_version=final.version, tool_call=call)

    async def _encoder_call(self, kind: str, context: grpc.aio.ServicerContext, run: Any) -> Any:
        """Embed and Rerank: metadata, auth and deadline as for Generate, then `run(tenant,
        request_id, timeout)` on the shared core; a refusal is the same gRPC status."""
        request_id = f"{kind}-{uuid.uuid4().hex}"
        try:
            metadata = dict(context.invocation_metadata() or ())
            echo = client_request_id(metadata) if "x-request-id" in metadata else None
            await context.send_initial_metadata((("x-request-id", echo or request_id),))
            continue_trace(metadata)
            tenant = self._dispatcher.authenticate(bearer_token(metadata.get("authorization")))
            remaining = context.time_remaining()
            return await run(tenant, request_id, remaining if remaining is not None and remaining > 0 else None)
        except TierflowError as exc:
            status = error_status(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        async def run(tenant: Tenant, request_id: str, timeout: float | None) -> pb.EmbedResponse:
            if len(request.model) > MAX_NAME_CHARS or len(request.inputs) > MAX_INPUTS:
                raise InvalidRequest(f"model has at most {MAX_NAME_CHARS} characters, inputs at most {MAX_INPUTS} items", param="inputs")
            done = await self._encoders.embed(request.model, list(request.inputs), dimensions=request.dimensions or None, tenant=tenant,
                                              request_id=request_id, timeout=timeout)
            usage = pb.Usage(prompt_tokens=done.prompt_tokens, total_tokens=done.prompt_tokens)
            return pb.EmbedResponse(id=request_id, model=request.model, usage=usage,
                                    data=[pb.Embedding(index=i, values=v.tolist()) for i, v in enumerate(done.vectors)])
        return await self._encoder_call("embd", context, run)

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        async def run(tenant: Tenant, request_id: str, timeout: float | None) -> pb.RerankResponse:
            if len(request.model) > MAX_NAME_CHARS or len(request.documents) > MAX_DOCUMENTS:
                raise InvalidRequest(f"model has at most {MAX_NAME_CHARS} characters, documents at most {MAX_DOCUMENTS} items", param="documents")
            docs = list(request.documents)
            done = await self._encoders.rerank(request.model, request.query, docs, top_n=request.top_n or None, tenant=tenant,
                                               request_id=request_id, timeout=timeout)
            results = [pb.RerankResult(index=i, relevance_score=score, document=docs[i] if request.return_documents else "") for i, score in done.results]
            return pb.RerankResponse(id=request_id, model=request.model, results=results,
                                     usage=pb.Usage(prompt_tokens=done.prompt_tokens, total_tokens=done.prompt_tokens))
        return await self._encoder_call("rerank", context, run)


async def start_grpc(
    dispatcher: Dispatcher, clock: Clock, metrics: RouterMetrics, host: str, port: int, *, max_calls: int = 0,
    credentials: grpc.ServerCredentials | None = None, serving: bool = True,
) -> grpc.aio.Server:
    """`serving`: the health status to start with (the router starts NOT_SERVING and
    follows its readiness with `runtime.grpc_server.set_serving`)."""
    servicer = InferenceServicer(dispatcher, clock, metrics, (host, port))
    name = pb.DESCRIPTOR.services_by_name["Inference"].full_name
    return await start_grpc_server(lambda server: pb_grpc.add_InferenceServicer_to_server(servicer, server), [name], host, port,
                                   max_calls=max_calls, credentials=credentials, serving=serving)  # fmt: skip
