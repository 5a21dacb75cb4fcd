"""The request path inside the router: admit the tenant, resolve the model, place, stream, retry.

`Dispatcher.generate` is what both front doors (OpenAI HTTP and gRPC) call. It yields
the node's `Tokens` and finally its `Finished`; every failure is a `TierflowError` the
front door renders in its own protocol.

A request runs as one or more *legs*, each a node's stream:

- A leg that fails before the client saw any token moves the request to the next node
  (the failed node is marked suspect): at most `max_attempts` legs.
- A leg that fails after tokens went out (the node died, stalled, shut down, or its
  stream has a gap) is *migrated*: the next leg goes to another node serving the same
  model version with the prompt plus every token already sent (`resume_token_ids`), and
  continues the same completion from that index (exact: the emulator is deterministic,
  keyed by model, seed and prompt). The client sees one stream; at most `max_migrations`
  times, then a clear error.
- When no node can take the next leg this instant but one is out only for a moment
  (suspect, or silent for under `resume_wait`: a NATS member died under it, it is
  restarting), the request waits up to `resume_wait` for it, its deadline permitting,
  rather than fail: a fresh request too, when every node of its model is so.
- Token indices are checked on every message: a repeat (a resumed leg may overlap) is
  trimmed, a gap is a failure of the node, never text silently missing.
- A deadline (the client's timeout, the tenant's or the router's default) goes to the node
  as `timeout_s`, and the router stops waiting when it passes (504 `deadline_exceeded`).

Disaggregated deployments take one more hop per leg: a prefill node of the same deployment
computes the prompt's KV (max_tokens = 0), then the decode node is told where the KV
comes from and pays its transfer instead of the prefill.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import msgspec
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, use_span

from tierflow.contracts import events, messages, subjects
from tierflow.placement.admission import Admission, Ticket
from tierflow.placement.agent_loops import WATCH, AgentLoopTracker
from tierflow.placement import (
    ANYWHERE,
    Choice,
    NoEligibleNode,
    PlacementPolicy,
    PlacementRequest,
    SessionTable,
    Tenant,
    TenantDirectory,
    session_key,
)
from tierflow.placement.tenants import Reservation
from tierflow.rdu.kvcache import block_hashes
from tierflow.runtime.clock import Clock
from tierflow.runtime.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    NodeFailure,
    RateLimited,
    TierflowError,
    Unauthenticated,
)
from tierflow.runtime.logs import log_record
from tierflow.runtime.tracing import PROVIDER_NAME, exporting, front_door, start_send, tracer
from tierflow.services.router.metrics import RouterMetrics
from tierflow.placement.candidates import CandidateIndex
from tierflow.placement.tables import ModelRoute, ModelTable, NodeTable
from tierflow.services.router.transport import NodeLost, NodeStream, NodeTransport
from tierflow.tokenizer import TokenLimitExceeded, decode_output, encode_async
from tierflow.workload.trace_text import TRACE_BLOCK_TOKENS

__all__ = ["ENCODER_APIS", "Dispatcher", "GenerateParams", "RequestRecord", "finish_record", "trace_block_ids"]

log = logging.getLogger("tierflow.request")
_spans = tracer("tierflow.router")

# Codes a node may send that are the caller's fault: no other node would do better.
_CLIENT_ERRORS = {"context_length_exceeded", "bad_request", "invalid_request"}
_RESUME_POLL_S = 0.1  # how often a broken stream waiting for a node looks again
_TOKENIZED_MAX_CHARS = 2048  # prompts up to this long are remembered tokenized ...
_TOKENIZED_ENTRIES = 1024  # ... this many of them (oldest out first: at most ~2 MiB of text)
_HASHED_MAX_TOKENS = 512  # prompts up to this many tokens have their block hashes remembered


# Front-door APIs served by encoder models: api -> the model kind it needs. Their requests
# run on the node as prefill-only requests (max_tokens 0): one forward pass, its time and
# its place in the chip's schedule emulated; the front door computes the vectors/scores.
ENCODER_APIS = {"embeddings": "embed", "rerank": "rerank"}
_ENDPOINT_OF = {"generate": "/v1/chat/completions or /v1/completions", "embed": "/v1/embeddings", "rerank": "/v1/rerank"}


K = TypeVar("K")
V = TypeVar("V")


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    """Put `value` in one of the dispatcher's bounded caches, the oldest entry out when full."""
    if len(cache) >= _TOKENIZED_ENTRIES:
        del cache[next(iter(cache))]
    cache[key] = value


def _operation(api: str) -> str:
    """The GenAI operation name of a front-door API."""
    return {"chat": "chat", "embeddings": "embeddings", "rerank": "rerank"}.get(api, "text_completion")


@dataclass(slots=True)
class GenerateParams:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    max_tokens: int | None
    api: str  # "chat" | "completions" | "grpc"
    tenant: Tenant | None = None
    seed: int | None = None
    temperature: float = 1.0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    session_header: str = ""
    user: str = ""
    workload: str | None = None  # "interactive" | "batch" | None (the tenant's default)
    timeout: float | None = None  # seconds the client will wait (its header, its gRPC deadline); None: not said
    output_token_ids: list[int] = field(default_factory=list)  # a planned completion (structured output); empty: drawn
    request_class: str = "standard"  # resolved against the tenant's allowance (tierflow.placement.classes)


@dataclass(slots=True)
class RequestRecord:
    """The one structured record each request leaves (logged when it ends)."""

    request_id: str
    api: str
    model: str = ""
    version: str = ""
    tenant: str = "anonymous"
    request_class: str = "standard"
    node: str = ""
    prefill_node: str = ""
    nodes_tried: list[str] = field(default_factory=list)
    placement: str = ""
    tier: str = ""
    prefix_hit_tokens: int = 0
    session: str = ""
    session_nodes: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int = 0
    hash_ids: list[int] = field(default_factory=list)  # the prompt's 512-token blocks (see trace_block_ids)
    finish_reason: str = ""
    migrations: int = 0  # legs resumed on another node after tokens had gone out
    outcome: str = "ok"
    error: str = ""
    status: int = 200
    stream: bool = False
    arrived: float = 0.0  # monotonic
    decode_queue_time: float = 0.0
    time_to_first_token: float = 0.0
    e2e: float = 0.0
    energy_j: float = 0.0  # the nodes' Finished energy: prefill leg + the leg that finished
    agent_loop: str = ""  # the agent-loop policy's word on this step (x-tierflow-agent-loop), "" for none
    admitted_at: float = 0.0  # wall time its tenant admitted it (0: not admitted): it then has a usage ledger record
    reservation: Reservation | None = None  # its tokens held against the tenant's quota until it ends (not logged)
    booked: bool = False  # quota settled and ledger record written (once)

    def charged(self) -> tuple[int, int, int]:
        """(prompt, cached, completion) tokens its tenant is charged: a finished request its
        usage; a failed or cancelled one its prompt once any output came, plus the completion
        tokens the client received; nothing when no token came out."""
        if self.finish_reason or self.completion_tokens:
            return self.prompt_tokens, self.prefix_hit_tokens, self.completion_tokens
        return 0, 0, 0

    def failed(self, exc: TierflowError) -> None:
        self.outcome, self.status, self.error = "error", exc.http_status, exc.code or exc.error_type

    def cancelled(self) -> None:
        """The client went away (HTTP has no status for it; 499 is nginx's convention)."""
        self.outcome, self.status = "cancelled", 499

    def emit(self) -> None:
        decode_time = self.e2e - self.time_to_first_token
        tps = (self.completion_tokens - 1) / decode_time if self.completion_tokens > 1 and decode_time > 0 else 0.0
        log_record(log, "request", {
            "request_id": self.request_id, "api": self.api, "model": self.model, "model_version": self.version,
            "tenant": self.tenant, "request_class": self.request_class, "node": self.node, "prefill_node": self.prefill_node, "nodes_tried": self.nodes_tried,
            "attempts": len(self.nodes_tried), "migrations": self.migrations, "placement": self.placement, "tier": self.tier,
            "prefix_hit": self.prefix_hit_tokens > 0, "prefix_hit_tokens": self.prefix_hit_tokens,
            "session": self.session, "session_nodes": self.session_nodes, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "max_tokens": self.max_tokens, "hash_ids": self.hash_ids,
            "finish_reason": self.finish_reason, "stream": self.stream, "energy_j": round(self.energy_j, 3),
            "outcome": self.outcome, "status": self.status, "error": self.error, "agent_loop": self.agent_loop,
            "quota_reserved": self.reservation.tokens if self.reservation is not None else 0,
            "decode_queue_time": round(self.decode_queue_time, 6), "time_to_first_token": round(self.time_to_first_token, 6),
            "e2e_latency": round(self.e2e, 6), "completion_tokens_per_sec": round(tps, 2),
        })


def trace_block_ids(hashes: list[int], block_size: int, token_ids: list[int]) -> list[int]:
    """The ids of the prompt's full 512-token blocks, for `tierflow loadtest export-trace`.

    Block hashes are chained, so the hash of the last placement block inside each 512
    tokens already names the whole prefix up to there: the ids are a slice of the hashes
    placement computed anyway, not a second pass over the prompt (unless the block size
    does not divide 512).
    """
    if TRACE_BLOCK_TOKENS % block_size == 0:
        step = TRACE_BLOCK_TOKENS // block_size
        return hashes[step - 1 :: step]
    return block_hashes(token_ids, TRACE_BLOCK_TOKENS)


class _LegFailed(Exception):
    """This leg's node failed (lost, stalled, refused as retryable, a gap in its stream):
    the request goes on elsewhere, as a retry or, once tokens went out, a migration."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class _PrefillFailed(_LegFailed):
    """The leg's prefill node failed, not its decode node: the next leg may use the same
    decode node (a 1-decode : 3-prefill deployment has no other), never that prefill node."""

    def __init__(self, message: str, code: str, prefill_node: str) -> None:
        super().__init__(message, code)
        self.prefill_node = prefill_node


class _Progress:
    """What the client has received so far, across legs: the completion's token ids."""

    __slots__ = ("token_ids",)

    def __init__(self) -> None:
        self.token_ids: list[int] = []

    @property
    def next_index(self) -> int:
        return len(self.token_ids)


def _trim(event: messages.Tokens, skip: int) -> messages.Tokens | None:
    """`event` without its first `skip` tokens (the client has them already), or None."""
    ids = event.token_ids[skip:]
    if not ids:
        return None
    return messages.Tokens(request_id=event.request_id, index=event.index + skip, token_ids=ids, text=decode_output(ids))


async def _coalesce(stream: NodeStream, event: messages.Tokens) -> tuple[messages.Tokens, messages.StreamEvent | NodeLost | None]:
    """`event` and the Tokens messages that follow it already received, as one (the client
    gets them in one SSE frame, the router does one pass of its per-message work), and the
    first message read that does not continue them (or its NodeLost), to be handled next.
    Only what is already here is taken: the first token is never held back for more."""
    ids: list[int] | None = None
    texts: list[str] = []
    index = event.index + len(event.token_ids)
    held: messages.StreamEvent | NodeLost | None = None
    while stream.buffered():
        try:
            following = await stream.next()  # returns at once: the message is here
        except NodeLost as lost:
            held = lost
            break
        if type(following) is not messages.Tokens or following.index != index:  # type: ignore[union-attr]
            held = following  # Finished, a repeat or a gap: the loop's checks handle it
            break
        if ids is None:
            ids, texts = list(event.token_ids), [event.text]
        ids.extend(following.token_ids)  # type: ignore[union-attr]
        texts.append(following.text)  # type: ignore[union-attr]
        index += len(following.token_ids)  # type: ignore[union-attr]
    if ids is None:
        return event, held
    return messages.Tokens(request_id=event.request_id, index=event.index, token_ids=ids, text="".join(texts)), held


class Dispatcher:
    def __init__(
        self,
        nodes: NodeTable,
        models: ModelTable,
        transport: NodeTransport,
        clock: Clock,
        metrics: RouterMetrics,
        *,
        policy: PlacementPolicy,
        tenants: TenantDirectory,
        sessions: SessionTable,
        max_attempts: int = 3,
        max_migrations: int = 2,
        resume_wait: float = 5.0,
        default_timeout: float = 600.0,
        seed: int | None = None,
        on_session: Callable[[str, str], None] | None = None,
        on_suspect: Callable[[str], None] | None = None,
        admission: Admission | None = None,
        agent_loops: AgentLoopTracker | None = None,
        on_agent_loop: Callable[[events.AgentLoopEvent], None] | None = None,
        on_usage: Callable[[RequestRecord], Awaitable[None] | None] | None = None,
    ) -> None:
        """`on_session(session, node)` and `on_suspect(node)`: what this router learned
        that the other routers should hear about (see services/router/peers.py).
        `on_usage(record)`: a request its tenant admitted has ended (its usage ledger
        record; called once; see services/router/usage_ledger.py). What it returns, if
        anything, is awaited before a finished request's `Finished` goes to the front door:
        the ledger's acknowledgement, so an answer's usage is stored before it is reported.
        `admission`: per-model limits on requests in flight (None: admit everything).
        `resume_wait`: how long a broken stream may wait for a node to resume it when
        none can at once (its deadline permitting). `agent_loops`: the sessions' steps and
        prompt growth against their tenants' agent-loop policies (a fresh tracker if None);
        `on_agent_loop(event)`: a session was flagged or capped (published on NATS; must not block)."""
        self._nodes = nodes
        self._candidates = CandidateIndex(nodes)  # the nodes serving each model, kept current per heartbeat
        self._models = models
        self._transport = transport
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._tenants = tenants
        self._sessions = sessions
        self._max_attempts = max_attempts
        self._max_migrations = max_migrations
        self._resume_wait = resume_wait
        self._default_timeout = default_timeout
        self._rng = random.Random(seed)
        self._on_session = on_session
        self._on_suspect = on_suspect
        self._admission = admission
        self._loops = agent_loops if agent_loops is not None else AgentLoopTracker()
        self._on_agent_loop = on_agent_loop
        metrics.agent_loop_sessions.set_function(self._loops.__len__)
        self._on_usage = on_usage
        # Short prompts recently tokenized (rendered chat text -> ids): a system prompt or a
        # benchmark's body comes back again and again, and the tokenizer is deterministic.
        self._tokenized: dict[str, tuple[int, ...]] = {}
        # Short prompts' block hashes and trace block ids, by token ids (see _prompt_hashes).
        self._hashed: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------------ admission

    def authenticate(self, api_key: str | None) -> Tenant:
        tenant = self._tenants.authenticate(api_key)
        if tenant is None:
            raise Unauthenticated(
                "Incorrect API key provided." if api_key else "Missing API key: send it as `Authorization: Bearer <key>`.",
                code="invalid_api_key",
            )
        return tenant

    def resolve(self, model: str, tenant: Tenant | None = None) -> ModelRoute:
        route = self._models.routes.get(model)
        if route is None or (tenant is not None and not tenant.allows_model(model)):
            raise ModelNotFound(f"The model `{model}` does not exist or is not deployed.", param="model", code="model_not_found")
        return route

    async def tokenize(self, model: str, text: str, tenant: Tenant | None) -> list[int]:
        """A prompt's token ids, for either front door, without holding the event loop:
        long texts are tokenized in windows with a yield between (every other stream keeps
        flowing), and tokenizing stops once the prompt cannot fit the model's context, so
        an 8 MiB prompt costs what its first `max_context` tokens cost, then a 400."""
        route = self.resolve(model, tenant)  # an unknown model is a 404 before any work
        cacheable = len(text) <= _TOKENIZED_MAX_CHARS
        if cacheable:
            known = self._tokenized.get(text)
            if known is not None and len(known) <= route.max_context:
                return list(known)  # a copy: the caller owns its list
        try:
            ids = await encode_async(text, limit=route.max_context)
        except TokenLimitExceeded as too_long:
            raise InvalidRequest(
                f"This model's maximum context length is {route.max_context} tokens. However, your prompt has more than "
                f"{too_long.limit} tokens (counting stopped at {too_long.found}). Please reduce the length of the prompt.",
                param="messages", code="context_length_exceeded",
            ) from None
        if cacheable:
            _remember(self._tokenized, text, tuple(ids))
        return ids

    def _prompt_hashes(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """The prompt's placement block hashes and its trace block ids. Short prompts'
        are remembered (a system prompt or a benchmark's body comes back again and again;
        hashing is deterministic): the lists are shared, read only by placement and the
        record. Ids outside [0, 2**32) are a 400 (a remembered prompt was checked)."""
        block_size = self._nodes.block_size
        short = len(token_ids) <= _HASHED_MAX_TOKENS
        if short:
            key = tuple(token_ids)
            known = self._hashed.get(key)
            if known is not None:
                return known
        try:
            hashes = block_hashes(token_ids, block_size)
        except ValueError as exc:  # token ids outside [0, 2**32)
            raise InvalidRequest(f"Invalid prompt token ids: {exc}", param="prompt", code="invalid_prompt") from None
        both = (hashes, trace_block_ids(hashes, block_size, token_ids))
        if short:
            _remember(self._hashed, key, both)
        return both

    def _limit_tokens(self, route: ModelRoute, params: GenerateParams) -> int:
        n_prompt = len(params.prompt_token_ids)
        limit = route.max_context
        if params.api in ENCODER_APIS:  # one forward pass, nothing decoded (a prefill-only request)
            if n_prompt > limit:
                raise InvalidRequest(
                    f"This model's maximum context length is {limit} tokens. However, an input has {n_prompt} tokens. "
                    "Please reduce the length of the input.", param="input", code="context_length_exceeded",
                )
            return 0
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

    def _deadline(self, params: GenerateParams, record: RequestRecord) -> float:
        """When the router stops working on the request: the client's timeout, else the
        tenant's, else the router's default, whichever is shortest, from its arrival."""
        limit = self._default_timeout
        tenant = params.tenant
        if tenant is not None and tenant.timeout_s is not None:
            limit = min(limit, tenant.timeout_s)
        if params.timeout is not None:
            limit = min(limit, params.timeout)
        return record.arrived + limit

    # ------------------------------------------------------------------ the request

    async def generate(self, params: GenerateParams, record: RequestRecord) -> AsyncIterator[messages.Tokens | messages.Finished]:
        """Stream one request's tokens: retried before the first token, migrated after it."""
        tenant = params.tenant
        record.tenant = tenant.name if tenant is not None else "anonymous"
        record.request_class = params.request_class
        route = self.resolve(params.model, tenant)
        wanted = ENCODER_APIS.get(params.api, "generate")
        if route.kind != wanted:
            raise InvalidRequest(
                f"The model `{params.model}` is a {route.kind} model; "
                + (f"use {_ENDPOINT_OF[route.kind]}" if route.kind in _ENDPOINT_OF else "it does not take this request"),
                param="model", code="wrong_model_kind",
            )
        max_tokens = self._limit_tokens(route, params)
        version = route.pick_version(self._rng)
        record.model, record.version, record.prompt_tokens = params.model, version, len(params.prompt_token_ids)
        session = session_key(record.tenant, params.session_header or None, params.user or None) if (params.session_header or params.user) else ""
        record.session = session
        prompt_hashes, record.hash_ids = self._prompt_hashes(params.prompt_token_ids)
        record.max_tokens = max_tokens
        if session and params.api not in ENCODER_APIS:
            self._police(params, record)
        placement = PlacementRequest(
            model=params.model,
            version=version,
            prompt_hashes=prompt_hashes,
            session_id=session,
            affinity_node=self._sessions.last_node(session, params.model) if session else None,
            boundary=tenant.boundary if tenant is not None else ANYWHERE,
            workload=params.workload or (tenant.workload if tenant is not None else None),  # type: ignore[arg-type]
            prompt_tokens=len(params.prompt_token_ids),
        )
        # One seed for every leg: a migrated leg must continue the same completion.
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        deadline = self._deadline(params, record)
        # Last of the checks, and released in the `finally` below on every way out.
        ticket = self._admission.admit(
            params.model, self._clock.monotonic(), tenant=record.tenant, weight=tenant.weight if tenant is not None else 1.0,
            request_class=params.request_class,
        ) if self._admission is not None else None  # fmt: skip
        if tenant is not None:
            max_tokens = self._admit_tenant(tenant, params, record, max_tokens, ticket)
        # A span only when something exports it (tracing.exporting): otherwise it and its
        # traceparent are work nobody sees (issue 16).
        traced = exporting()
        # SERVER, in the caller's trace when it sent a traceparent (the front door made it current).
        span: Span = _spans.start_span(f"{_operation(params.api)} {params.model}", kind=SpanKind.SERVER) if traced else INVALID_SPAN
        with use_span(span, end_on_exit=True) if traced else nullcontext():
            if traced:
                _request_attributes(span, params, max_tokens, seed)
                span.set_attribute("gen_ai.usage.input_tokens", len(params.prompt_token_ids))
                span.set_attribute("tierflow.request_id", params.request_id)
                span.set_attribute("tierflow.tenant", record.tenant)
                if record.agent_loop:
                    span.set_attribute("tierflow.agent_loop", record.agent_loop)
                if record.reservation is not None:
                    span.set_attribute("tierflow.quota_reserved_tokens", record.reservation.tokens)
            try:
                async for event in self._legs(params, record, placement, route, max_tokens, seed, deadline, span, ticket):
                    yield event
            except TierflowError as exc:
                record.failed(exc)  # here too: the usage record is written below, before the front door sees it
                if traced:
                    span.set_attribute("error.type", exc.code or exc.error_type)
                    span.set_status(Status(StatusCode.ERROR, exc.message))
                raise
            except Exception as exc:  # a bug: the span says which, as the convention asks
                if traced:
                    span.set_attribute("error.type", type(exc).__qualname__)
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            finally:
                # Here, not after the loop: a front door stops iterating at Finished (a
                # streamed request's generator is closed there), so nothing after it runs.
                if traced:
                    span.set_attribute("tierflow.migrations", record.migrations)
                    if record.finish_reason:
                        span.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
                        span.set_attribute("gen_ai.usage.output_tokens", record.completion_tokens)
                        span.set_attribute("gen_ai.response.finish_reasons", [record.finish_reason])
                        span.set_attribute("gen_ai.response.model", record.model)
                    span.set_attribute("tierflow.node", record.node)
                    span.set_attribute("tierflow.tier", record.tier)
                if ticket is not None:
                    ticket.release(self._clock.monotonic())
                if not record.booked and record.admitted_at:
                    if record.outcome == "ok" and not record.finish_reason:
                        record.cancelled()  # closed before it finished: the client went away
                    self._book(record)

    def _admit_tenant(self, tenant: Tenant, params: GenerateParams, record: RequestRecord, max_tokens: int, ticket: Ticket | None) -> int:
        """The tenant's rate limit and token quota (`Tenant.admit`, in wall time: the quota's
        windows and the usage ledger's are): the request's max_tokens, clamped to what the
        quota can cover when the client sent none. A refusal gives back the admission ticket."""
        now = self._clock.now()
        try:
            reservation = tenant.admit(now, len(params.prompt_token_ids), max_tokens, clamp=params.max_tokens is None and max_tokens > 0)
        except TierflowError:
            if ticket is not None:
                ticket.release(self._clock.monotonic())
            raise
        record.admitted_at = now
        if reservation is not None:
            record.reservation = reservation
            max_tokens = record.max_tokens = reservation.max_tokens
        return max_tokens

    def _book(self, record: RequestRecord) -> Awaitable[None] | None:
        """Close the request's account, once: the quota reservation settles to what it is
        charged (`RequestRecord.charged`, the rest released) and its usage record goes to
        the ledger (`on_usage` queues it; what it returns awaits its acknowledgement)."""
        record.booked = True
        if record.reservation is not None:
            prompt, _, completion = record.charged()
            record.reservation.settle(prompt + completion)
        return self._on_usage(record) if self._on_usage is not None else None

    def _settle(self, params: GenerateParams, record: RequestRecord) -> Awaitable[None] | None:
        """Book-keeping once the node says it finished, before the caller sees `Finished`
        (a front door may stop iterating at `Finished`: the encoders' leaves the generator
        to be closed later), so the quota and the ledger know at once. Returns what to
        await before `Finished` goes out (the usage record stored), if anything."""
        stored = self._book(record) if record.admitted_at and not record.booked else None
        if record.session:
            self._loops.settle(record.session, record.completion_tokens)
            record.session_nodes = self._sessions.touch(record.session, record.node, record.model)
            if self._on_session is not None:
                self._on_session(record.session, record.node)
        if record.completion_tokens > 1 and record.time_to_first_token > 0 and not record.migrations:
            decode = self._clock.monotonic() - record.arrived - record.time_to_first_token
            self._models.observe_decode(record.model, decode)
        return stored

    def _police(self, params: GenerateParams, record: RequestRecord) -> None:
        """The step against its tenant's agent-loop policy (tierflow.placement.agent_loops):
        counted, flagged (the header, a metric, an event) or refused with its 403."""
        tenant = params.tenant
        policy = tenant.policy.agent_loops if tenant is not None and tenant.policy.agent_loops is not None else WATCH
        if policy.inert:
            return
        verdict = self._loops.check(record.session, policy, record.prompt_tokens, record.hash_ids, self._clock.monotonic())
        if verdict is None:
            return
        record.agent_loop = verdict.header
        labels = (record.tenant, verdict.limit, verdict.action)
        if verdict.event:
            self._metrics.agent_loop_flagged.labels(*labels).inc()
            log.info("agent session %s flagged (%s): %s", record.session, verdict.event, verdict.header,
                     extra={"fields": {"request_id": params.request_id, "session": record.session, "agent_loop": verdict.header}})  # fmt: skip
            if self._on_agent_loop is not None:
                self._on_agent_loop(events.AgentLoopEvent(
                    kind=verdict.event, tenant=record.tenant, session=record.session, limit=verdict.limit, action=verdict.action,  # type: ignore[arg-type]
                    steps=verdict.steps, tokens=verdict.tokens, prompt_tokens=verdict.prompt_tokens, growth=round(verdict.growth, 1),
                    repeated=round(verdict.repeated, 3), model=record.model, request_id=params.request_id, at=self._clock.now(),
                ))  # fmt: skip
        if verdict.error is not None:
            self._metrics.agent_loop_refused.labels(*labels).inc()
            raise verdict.error

    def _suspect(self, node_id: str) -> None:
        self._nodes.mark_suspect(node_id, self._clock.monotonic())
        if self._on_suspect is not None:
            self._on_suspect(node_id)

    def _check_deadline(self, deadline: float, record: RequestRecord) -> None:
        if self._clock.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"the request's deadline passed after {deadline - record.arrived:.1f}s"
                + (f" ({record.completion_tokens} tokens streamed)" if record.completion_tokens else " before any output"),
                code="deadline_exceeded",
            )

    def _place(
        self, placement: PlacementRequest, route: ModelRoute, tried: set[str], last_failure: str, progress: _Progress, *, revisit: bool,
    ) -> tuple[Choice, PlacementRequest]:
        """The next node to try (with its placement reason and cached prefix), and the request (version may fall back).
        `revisit`: with no untried node, a node that failed this request may take it again."""
        while True:
            try:
                try:
                    ranked = self._candidates.rank(self._policy, placement.excluding(tried), self._clock.monotonic())
                except NoEligibleNode:
                    if not revisit:
                        raise
                    # No other node: a node that failed it and serves again (its NATS link
                    # broke, its stall ended) takes it again, mid-stream just as exactly.
                    ranked = self._candidates.rank(self._policy, placement, self._clock.monotonic())
                return ranked.best, placement
            except NoEligibleNode as none:
                if none.code == "version_not_served" and placement.version != route.default_version and not progress.token_ids:
                    # A canary version with no live node: its traffic goes to the stable version
                    # (never mid-stream: the rest of a completion must come from the same version).
                    placement = replace(placement, version=route.default_version)
                    continue
                if progress.token_ids:
                    raise NodeFailure(
                        f"the stream of model {placement.model!r} broke after {progress.next_index} tokens on "
                        f"{', '.join(sorted(tried))} ({last_failure}), and no other node serving version "
                        f"{placement.version!r} can resume it now: {none.reason}; the response is incomplete, retry the request",
                        code="node_lost", retryable=True,
                    ) from None
                if tried:
                    raise NodeFailure(
                        f"model {placement.model!r} failed on {', '.join(sorted(tried))} before producing output ({last_failure}), "
                        f"and no other node can take it now: {none.reason}",
                        code="no_healthy_node", retryable=True,
                    ) from None
                raise NoCapacity(none.reason, code=none.code) from None

    async def _legs(
        self, params: GenerateParams, record: RequestRecord, placement: PlacementRequest, route: ModelRoute,
        max_tokens: int, seed: int, deadline: float, span: Span, ticket: Ticket | None,
    ) -> AsyncIterator[messages.Tokens | messages.Finished]:
        tried: set[str] = set()
        bad_prefill: set[str] = set()  # prefill nodes that failed this request
        progress = _Progress()
        last_failure = ""
        overloaded = retries = 0
        attempt = 0
        wait_until = 0.0  # while the request waits for a node to come back
        while True:
            self._check_deadline(deadline, record)
            now = self._clock.monotonic()
            try:
                choice, placement = self._place(placement, route, tried, last_failure, progress, revisit=bool(progress.token_ids) or now < wait_until)
            except (NodeFailure, NoCapacity) as none:
                if not progress.token_ids and tried and overloaded == len(tried):
                    break  # every node that could serve it is full: that is back-pressure, not failure
                if not wait_until and not tried and none.code == "unavailable" and self._nodes.may_return(placement.model, now, within=self._resume_wait):
                    # Every node of the model is out for a moment (suspect or just silent:
                    # a NATS member died under them, one is restarting): wait for one.
                    wait_until = min(deadline, now + self._resume_wait)
                if now < wait_until:
                    # No node can take it this instant (the only one just failed it, or all
                    # are suspect after a NATS member died): one is usually back within a
                    # heartbeat or two, and a client sees a wait rather than a failure.
                    await self._clock.sleep(_RESUME_POLL_S)
                    continue
                raise
            node_id, reason = choice.node_id, choice.reason
            attempt += 1
            record.version = placement.version or record.version
            tried.add(node_id)
            record.nodes_tried.append(node_id)
            record.node, record.placement = node_id, reason
            self._metrics.routing.labels(params.model, reason).inc()
            view = self._nodes.get(node_id)
            booked = max(0, placement.prompt_tokens - choice.prefix_blocks * self._nodes.block_size)  # to prefill there
            self._nodes.note_dispatch(node_id, params.model, evicts=self._models.at_risk(view, params.model) if view else (), prompt_tokens=booked)
            seen = started = False  # the leg's first event came; the node table moved it into the batch
            request = messages.GenerateRequest(
                request_id=params.request_id, model=params.model, version=record.version,
                prompt_token_ids=params.prompt_token_ids, max_tokens=max_tokens, seed=seed,
                temperature=params.temperature, ignore_eos=params.ignore_eos, stop=params.stop, tenant=record.tenant,
                session_id=record.session, attempt=attempt, resume_token_ids=list(progress.token_ids),
                timeout_s=max(0.001, deadline - self._clock.monotonic()), output_token_ids=params.output_token_ids,
                request_class=params.request_class, tenant_weight=params.tenant.weight if params.tenant is not None else 1.0,  # type: ignore[arg-type]
            )  # fmt: skip
            try:
                deployment = self._models.deployment(view.deployment) if view is not None else None
                if deployment is not None and deployment.mode == "disaggregated":
                    request.kv_source = await self._prefill(request, deployment.name, placement, record, deadline, bad_prefill)
                async for event in self._stream(node_id, request, record, params, progress, deadline, ticket):
                    if not seen:  # prefilled: in the node's batch, its prompt no longer queued there
                        seen = True
                        started = self._nodes.note_started(node_id, params.model, booked)
                    yield event
                return
            except _LegFailed as failure:
                last_failure = str(failure)
                if isinstance(failure, _PrefillFailed):
                    tried.discard(node_id)  # its decode node did nothing wrong
                    bad_prefill.add(failure.prefill_node)
                if failure.code != "queue_full":
                    wait_until = min(deadline, self._clock.monotonic() + self._resume_wait)
                if progress.token_ids:
                    record.migrations += 1
                    self._metrics.migrations.labels(params.model, failure.code).inc()
                    span.add_event("tierflow.migration", {"tierflow.node": node_id, "tierflow.reason": failure.code, "tierflow.tokens_sent": progress.next_index})
                    log.info("request %s: node %s failed after %d tokens (%s); resuming elsewhere", params.request_id, node_id, progress.next_index, failure,
                             extra={"fields": {"request_id": params.request_id, "node": node_id, "tokens_sent": progress.next_index, "reason": failure.code}})  # fmt: skip
                    if record.migrations > self._max_migrations:
                        raise NodeFailure(
                            f"the stream of model {params.model!r} broke {record.migrations} times ({', '.join(record.nodes_tried)}; "
                            f"last: {failure}) after {progress.next_index} tokens; the response is incomplete, retry the request",
                            code="node_lost", retryable=True,
                        ) from None
                    continue
                self._metrics.retries.labels(params.model, failure.code).inc()
                retries += 1
                if failure.code == "queue_full":
                    overloaded += 1
                if retries >= self._max_attempts:
                    break
            finally:  # the node table follows the leg until the node's next heartbeat
                self._nodes.note_ended(node_id, params.model, started=started, prompt_tokens=booked)
        if overloaded == len(tried):
            raise RateLimited(f"every node serving {params.model!r} is at capacity; retry shortly", retry_after=1.0, code="overloaded")
        raise NodeFailure(
            f"model {params.model!r} failed on {', '.join(record.nodes_tried)} before producing output ({last_failure}); retry the request",
            code="no_healthy_node", retryable=True,
        )

    def _failed(self, node_id: str, event: messages.Failed, record: RequestRecord, deadline: float) -> TierflowError | _LegFailed:
        """What a node's `Failed` means for the request."""
        if event.code in _CLIENT_ERRORS:
            return InvalidRequest(event.message, code=event.code)
        if event.code == "deadline_exceeded":
            return DeadlineExceeded(f"the request's deadline passed after {deadline - record.arrived:.1f}s: {event.message}", code="deadline_exceeded")
        if event.retryable:
            return _LegFailed(f"node {node_id}: {event.code}: {event.message}", event.code)
        return NodeFailure(f"node {node_id} failed the request: {event.message}", code=event.code)

    async def _prefill(
        self, request: messages.GenerateRequest, deployment: str, placement: PlacementRequest, record: RequestRecord,
        deadline: float, exclude: set[str],
    ) -> str:
        """Run the prompt (and any tokens already streamed) on a prefill node of the
        deployment, none of `exclude`; return that node's id."""
        now = self._clock.monotonic()
        candidates = [n for n in self._nodes.prefill_nodes(deployment) if n.takes_work(now) and n.node_id not in exclude]
        if not candidates:
            raise _LegFailed(f"no live prefill node in deployment {deployment!r}" + (f" besides {', '.join(sorted(exclude))}" if exclude else ""), "no_prefill_node")
        try:
            ranked = self._policy.rank(candidates, replace(placement, exclude=frozenset()), now, limit=1)
        except NoEligibleNode as none:
            raise _LegFailed(none.reason, "no_prefill_node") from None
        node_id = ranked.best.node_id
        record.prefill_node = node_id
        try:
            headers, sent = start_send(subjects.prefill_run(node_id))
            try:
                stream = await self._transport.open(node_id, msgspec.structs.replace(request, max_tokens=0), headers, role="prefill")
            finally:
                if sent is not None:
                    sent.end()
        except NodeLost as lost:
            raise _PrefillFailed(f"prefill node {node_id}: {lost.reason}", "node_lost", node_id) from None
        finished = False
        try:
            while True:
                try:
                    event = await stream.next()
                except NodeLost as lost:
                    if not lost.ours:
                        self._suspect(node_id)
                    raise _PrefillFailed(f"prefill node {node_id}: {lost.reason}", "node_lost", node_id) from None
                if type(event) is messages.Finished:
                    finished = True
                    record.prefix_hit_tokens = event.cached_tokens
                    record.energy_j += event.energy_j
                    return node_id
                if type(event) is messages.Failed:
                    failure = self._failed(node_id, event, record, deadline)
                    if isinstance(failure, (_LegFailed, NodeFailure)):
                        raise _PrefillFailed(str(failure), event.code, node_id)
                    raise failure
                self._check_deadline(deadline, record)
        finally:
            if finished:
                stream.close()
            else:
                await stream.cancel()

    async def _stream(
        self, node_id: str, request: messages.GenerateRequest, record: RequestRecord, params: GenerateParams,
        progress: _Progress, deadline: float, ticket: Ticket | None = None,
    ) -> AsyncIterator[messages.Tokens | messages.Finished]:
        clock = self._clock
        labels = (params.model, record.version, record.tenant)
        resumed = bool(progress.token_ids)
        try:
            headers, sent = start_send(subjects.node_generate(node_id))  # PRODUCER span, or the caller's context passed on
            try:
                stream: NodeStream = await self._transport.open(node_id, request, headers)
            finally:
                if sent is not None:
                    sent.end()
        except NodeLost as lost:
            raise _LegFailed(lost.reason, "node_lost") from None
        finished = False
        last_token_at = 0.0
        held: messages.StreamEvent | NodeLost | None = None  # read while coalescing, handled next
        try:
            while True:
                try:
                    if held is None:
                        event = await stream.next()
                    elif type(held) is NodeLost:
                        raise held
                    else:
                        event, held = held, None  # type: ignore[assignment]
                except NodeLost as lost:
                    if not lost.ours:
                        self._suspect(node_id)
                    raise _LegFailed(lost.reason, "node_lost") from None
                kind = type(event)
                if kind is messages.Tokens:
                    t = clock.monotonic()
                    if t >= deadline:
                        self._check_deadline(deadline, record)
                    expected = progress.next_index
                    if event.index != expected:  # type: ignore[union-attr]
                        if event.index > expected:  # type: ignore[union-attr]
                            if not stream.link_broke:  # lost on our side: not the node's fault
                                self._suspect(node_id)
                            raise _LegFailed(f"node {node_id} skipped tokens {expected}..{event.index - 1} (a message was lost)", "gap")  # type: ignore[union-attr]
                        trimmed = _trim(event, expected - event.index)  # type: ignore[arg-type, union-attr]
                        if trimmed is None:
                            continue
                        event = trimmed
                    if stream.buffered():
                        event, held = await _coalesce(stream, event)  # type: ignore[arg-type]
                    if not record.time_to_first_token:
                        record.time_to_first_token = t - record.arrived
                        self._metrics.ttft.labels(*labels).observe(record.time_to_first_token)
                    elif last_token_at:
                        self._metrics.itl.labels(*labels).observe((t - last_token_at) / len(event.token_ids))  # type: ignore[union-attr]
                    last_token_at = t
                    progress.token_ids.extend(event.token_ids)  # type: ignore[union-attr]
                    record.completion_tokens = len(progress.token_ids)
                    yield event  # type: ignore[misc]
                elif kind is messages.Finished:
                    if event.completion_tokens > progress.next_index:  # type: ignore[union-attr]
                        if not stream.link_broke:
                            self._suspect(node_id)
                        raise _LegFailed(f"node {node_id} finished at {event.completion_tokens} tokens but sent {progress.next_index} (a message was lost)", "gap")  # type: ignore[union-attr]
                    finished = True
                    record.finish_reason = event.finish_reason  # type: ignore[union-attr]
                    record.prompt_tokens = event.prompt_tokens  # type: ignore[union-attr]
                    record.completion_tokens = event.completion_tokens  # type: ignore[union-attr]
                    record.prefix_hit_tokens = max(record.prefix_hit_tokens, event.cached_tokens)  # type: ignore[union-attr]
                    record.energy_j += event.energy_j  # type: ignore[union-attr]
                    self._metrics.prompt_tokens.labels(*labels).inc(event.prompt_tokens)  # type: ignore[union-attr]
                    self._metrics.completion_tokens.labels(*labels).inc(event.completion_tokens)  # type: ignore[union-attr]
                    stored = self._settle(params, record)
                    if stored is not None:  # its usage record in the ledger (bounded) before the answer reports it
                        await stored
                    yield event  # type: ignore[misc]
                    return
                elif kind is messages.Started:
                    if not resumed:  # the request's own queue and tier; a resumed leg's are recomputation
                        record.decode_queue_time = event.queue_time  # type: ignore[union-attr]
                        record.tier = event.tier  # type: ignore[union-attr]
                        self._metrics.tiers.labels(params.model, event.tier).inc()  # type: ignore[union-attr]
                        if ticket is not None:
                            ticket.started(event.queue_time, clock.monotonic())  # type: ignore[union-attr]
                elif kind is messages.Failed:
                    raise self._failed(node_id, event, record, deadline)  # type: ignore[arg-type]
                else:  # Accepted and Alive only prove the node is still there
                    if clock.monotonic() >= deadline:
                        self._check_deadline(deadline, record)
        finally:
            if finished:
                stream.close()
            else:
                await stream.cancel()  # client gone, error, deadline or migration: free the node's slot


def _request_attributes(span: Span, params: GenerateParams, max_tokens: int, seed: int) -> None:
    """The GenAI request attributes, and where the caller reached us (the front door's note)."""
    span.set_attribute("gen_ai.operation.name", _operation(params.api))
    span.set_attribute("gen_ai.provider.name", PROVIDER_NAME)
    span.set_attribute("gen_ai.request.model", params.model)
    span.set_attribute("gen_ai.request.max_tokens", max_tokens)
    span.set_attribute("gen_ai.request.temperature", params.temperature)
    span.set_attribute("gen_ai.request.seed", seed)
    if params.stop:
        span.set_attribute("gen_ai.request.stop_sequences", params.stop)
    span.set_attribute("gen_ai.response.id", params.request_id)
    door = front_door()
    if door is not None:
        address, port, client_request_id = door
        span.set_attribute("server.address", address)
        span.set_attribute("server.port", port)
        if client_request_id:
            span.set_attribute("tierflow.client_request_id", client_request_id)


def finish_record(record: RequestRecord, metrics: RouterMetrics, clock: Clock) -> None:
    """Close a request's books: latency and outcome metrics, then its one log record."""
    record.e2e = clock.monotonic() - record.arrived
    if record.model:
        labels = (record.model, record.version or "-", record.tenant)
        metrics.requests.labels(*labels, record.outcome).inc()
        if record.outcome == "ok":
            metrics.e2e.labels(*labels).observe(record.e2e)
            metrics.vllm.served(record.model, record.finish_reason or "stop", record.prompt_tokens, record.completion_tokens)
    if record.outcome not in ("ok", "cancelled"):
        metrics.errors.labels(record.model or "-", record.error or record.outcome).inc()
    record.emit()
