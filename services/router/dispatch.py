"""The request path inside the router: resolve the model, place, stream, retry.

`Dispatcher.generate` is what both front doors (OpenAI HTTP and gRPC) call. It yields
the node's `Tokens` and finally its `Finished`; every failure is a `TierflowError` the
front door renders in its own protocol. Failures before the first token move the
request to the next node (the node is marked suspect); after the first token the
client has seen output, so it gets a clear error instead of a silent replay.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry.trace import Status, StatusCode

from tierflow.contracts import messages
from tierflow.placement.basic import rank_least_loaded
from tierflow.runtime.clock import Clock
from tierflow.runtime.errors import InvalidRequest, ModelNotFound, NoCapacity, NodeFailure, TierflowError
from tierflow.runtime.tracing import inject_headers, tracer
from tierflow.services.router.metrics import RouterMetrics
from tierflow.services.router.state import ModelRoute, ModelTable, NodeTable
from tierflow.services.router.transport import NodeLost, NodeTransport

__all__ = ["Dispatcher", "GenerateParams", "RequestRecord", "finish_record"]

log = logging.getLogger("tierflow.request")
_spans = tracer("tierflow.router")

# Codes a node may send that are the caller's fault: no other node would do better.
_CLIENT_ERRORS = {"context_length_exceeded", "bad_request", "invalid_request"}


@dataclass(slots=True)
class GenerateParams:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    max_tokens: int | None
    api: str  # "chat" | "completions" | "grpc"
    seed: int | None = None
    temperature: float = 1.0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    tenant: str = "default"
    session_id: str = ""


@dataclass(slots=True)
class RequestRecord:
    """The one structured record each request leaves (logged when it ends)."""

    request_id: str
    api: str
    model: str = ""
    version: str = ""
    tenant: str = "default"
    node: str = ""
    nodes_tried: list[str] = field(default_factory=list)
    tier: str = ""
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    outcome: str = "ok"
    error: str = ""
    status: int = 200
    stream: bool = False
    arrived: float = 0.0  # monotonic
    decode_queue_time: float = 0.0
    time_to_first_token: float = 0.0
    e2e: float = 0.0

    def failed(self, exc: TierflowError) -> None:
        self.outcome, self.status, self.error = "error", exc.http_status, exc.code or exc.error_type

    def cancelled(self) -> None:
        """The client went away (HTTP has no status for it; 499 is nginx's convention)."""
        self.outcome, self.status = "cancelled", 499

    def emit(self) -> None:
        decode_time = self.e2e - self.time_to_first_token
        tps = (self.completion_tokens - 1) / decode_time if self.completion_tokens > 1 and decode_time > 0 else 0.0
        log.info(
            "request",
            extra={"fields": {
                "request_id": self.request_id, "api": self.api, "model": self.model, "model_version": self.version,
                "tenant": self.tenant, "node": self.node, "nodes_tried": self.nodes_tried, "attempts": len(self.nodes_tried),
                "tier": self.tier, "prefix_hit_tokens": self.prefix_hit_tokens, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason, "stream": self.stream,
                "outcome": self.outcome, "status": self.status, "error": self.error,
                "decode_queue_time": round(self.decode_queue_time, 6), "time_to_first_token": round(self.time_to_first_token, 6),
                "e2e_latency": round(self.e2e, 6), "completion_tokens_per_sec": round(tps, 2),
            }},
        )


class Dispatcher:
    def __init__(
        self,
        nodes: NodeTable,
        models: ModelTable,
        transport: NodeTransport,
        clock: Clock,
        metrics: RouterMetrics,
        *,
        max_attempts: int = 3,
        seed: int | None = None,
    ) -> None:
        self._nodes = nodes
        self._models = models
        self._transport = transport
        self._clock = clock
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._rng = random.Random(seed)
        self._turn = 0

    def resolve(self, model: str) -> ModelRoute:
        route = self._models.routes.get(model)
        if route is None:
            raise ModelNotFound(f"The model `{model}` does not exist or is not deployed.", param="model", code="model_not_found")
        return route

    def _limit_tokens(self, route: ModelRoute, params: GenerateParams) -> int:
        n_prompt = len(params.prompt_token_ids)
        limit = route.max_context
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n_prompt
        if n_prompt + max_tokens > limit or max_tokens < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the prompt, {max(max_tokens, 1)} for the completion). "
                "Please reduce the length of the prompt or of max_tokens.",
                param="max_tokens" if params.max_tokens is not None else "messages",
                code="context_length_exceeded",
            )
        return max_tokens

    async def generate(self, params: GenerateParams, record: RequestRecord) -> AsyncIterator[messages.Tokens | messages.Finished]:
        """Stream one request's tokens, retrying on another node until the first token."""
        route = self.resolve(params.model)
        max_tokens = self._limit_tokens(route, params)
        version = route.pick_version(self._rng)
        record.model, record.version, record.prompt_tokens = params.model, version, len(params.prompt_token_ids)
        labels = (params.model, version, params.tenant)
        span_name = f"{'chat' if params.api == 'chat' else 'text_completion'} {params.model}"
        with _spans.start_as_current_span(span_name) as span:
            span.set_attribute("gen_ai.operation.name", "chat" if params.api == "chat" else "text_completion")
            span.set_attribute("gen_ai.request.model", params.model)
            span.set_attribute("gen_ai.request.max_tokens", max_tokens)
            span.set_attribute("gen_ai.usage.input_tokens", len(params.prompt_token_ids))
            span.set_attribute("tierflow.request_id", params.request_id)
            try:
                async for event in self._attempts(params, record, version, max_tokens, labels):
                    yield event
                span.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
                span.set_attribute("gen_ai.response.finish_reasons", [record.finish_reason])
                span.set_attribute("tierflow.node", record.node)
                span.set_attribute("tierflow.tier", record.tier)
            except TierflowError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.message))
                raise

    async def _attempts(
        self, params: GenerateParams, record: RequestRecord, version: str, max_tokens: int, labels: tuple[str, str, str]
    ) -> AsyncIterator[messages.Tokens | messages.Finished]:
        clock = self._clock
        tried: set[str] = set()
        last_failure = ""
        for attempt in range(1, self._max_attempts + 1):
            now = clock.monotonic()
            self._turn += 1
            ranked = [n for n in rank_least_loaded(self._nodes.views, params.model, now, turn=self._turn) if n not in tried]
            if not ranked:
                if tried:
                    raise NodeFailure(
                        f"model {params.model!r} failed on {', '.join(sorted(tried))} before producing output ({last_failure}), "
                        "and no other node can take it now; retry shortly",
                        code="no_healthy_node", retryable=True,
                    )
                raise NoCapacity(f"no node serving model {params.model!r} is available right now; retry shortly", code="no_capacity")
            node_id = ranked[0]
            tried.add(node_id)
            record.nodes_tried.append(node_id)
            self._nodes.note_dispatch(node_id)
            request = messages.GenerateRequest(
                request_id=params.request_id, model=params.model, version=version,
                prompt_token_ids=params.prompt_token_ids, max_tokens=max_tokens,
                seed=params.seed if params.seed is not None else self._rng.getrandbits(31), temperature=params.temperature,
                ignore_eos=params.ignore_eos, stop=params.stop, tenant=params.tenant,
                session_id=params.session_id, attempt=attempt,
            )
            stream = await self._transport.open(node_id, request, inject_headers({}))
            record.node = node_id
            got_tokens = False
            finished = False
            last_token_at = 0.0
            try:
                while True:
                    try:
                        event = await stream.next()
                    except NodeLost as lost:
                        self._nodes.mark_suspect(node_id, clock.monotonic())
                        if got_tokens:
                            raise NodeFailure(
                                f"node {node_id} was lost after streaming {record.completion_tokens} tokens ({lost.reason}); "
                                "the response is incomplete, retry the request",
                                code="node_lost",
                            ) from None
                        last_failure = lost.reason
                        self._metrics.retries.labels(params.model, "node_lost").inc()
                        break
                    if type(event) is messages.Tokens:
                        t = clock.monotonic()
                        if not got_tokens:
                            got_tokens = True
                            record.time_to_first_token = t - record.arrived
                            self._metrics.ttft.labels(*labels).observe(record.time_to_first_token)
                        else:
                            self._metrics.itl.labels(*labels).observe((t - last_token_at) / len(event.token_ids))
                        last_token_at = t
                        record.completion_tokens += len(event.token_ids)
                        yield event
                    elif type(event) is messages.Finished:
                        finished = True
                        record.finish_reason = event.finish_reason
                        record.prompt_tokens = event.prompt_tokens
                        record.completion_tokens = event.completion_tokens
                        record.prefix_hit_tokens = event.cached_tokens
                        self._metrics.prompt_tokens.labels(*labels).inc(event.prompt_tokens)
                        self._metrics.completion_tokens.labels(*labels).inc(event.completion_tokens)
                        yield event
                        return
                    elif type(event) is messages.Started:
                        record.decode_queue_time = event.queue_time
                        record.tier = event.tier
                        self._metrics.routing.labels(params.model, node_id, event.tier).inc()
                    elif type(event) is messages.Failed:
                        if event.code in _CLIENT_ERRORS:
                            raise InvalidRequest(event.message, code=event.code)
                        if got_tokens or not event.retryable:
                            raise NodeFailure(f"node {node_id} failed the request: {event.message}", code=event.code)
                        last_failure = f"{event.code}: {event.message}"
                        self._metrics.retries.labels(params.model, event.code).inc()
                        break
                    # Accepted and Alive only prove the node is still there.
            finally:
                if finished:
                    stream.close()
                else:
                    await stream.cancel()  # client gone, error, or retry: free the node's slot


def finish_record(record: RequestRecord, metrics: RouterMetrics, clock: Clock) -> None:
    """Close a request's books: latency and outcome metrics, then its one log record."""
    record.e2e = clock.monotonic() - record.arrived
    if record.model:
        labels = (record.model, record.version or "-", record.tenant)
        metrics.requests.labels(*labels, record.outcome).inc()
        if record.outcome == "ok":
            metrics.e2e.labels(*labels).observe(record.e2e)
    if record.outcome not in ("ok", "cancelled"):
        metrics.errors.labels(record.model or "-", record.error or record.outcome).inc()
    record.emit()
