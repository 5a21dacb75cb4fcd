"""The live driver: runs session plans against an OpenAI-compatible endpoint and records every call.

This is the package's one I/O module (the imperative shell around `sessions` and
`conversation`): it sleeps, reads the clock and talks HTTP through the official `openai`
client, so what it measures is what any OpenAI client of the fabric would see. Only the
streamed body's events are decoded by `chat_stream` rather than the client's per-chunk
models, which cost more CPU than everything else here (see that module).

Sessions start open-loop, at their planned times whatever the fabric's state, so a slow
fabric meets the planned load instead of slowing the load down (a closed loop would hide
queueing: coordinated omission). Within a session steps are closed-loop, as an agent's
are: a call needs the previous step's output. A call that fails ends its session, since
its history would be missing the reply.

One connection pool serves every tenant, sized for every session in flight at once, so
no request ever waits for a connection (that wait would count as fabric latency).
Progress goes to a callback, so the driver knows nothing about terminals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import httpx2
import msgspec
import openai

from tierflow.runtime.tls import TlsFiles, client_ssl_context, grpc_channel_credentials
from tierflow.tokenizer import count_tokens
from tierflow.workload.chat_stream import StreamError, Usage, read_chunks
from tierflow.workload.conversation import Conversation
from tierflow.workload.records import RequestRecord
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan

__all__ = ["LiveProgress", "LiveRun", "run_live", "served_models"]

REJECTED_STATUSES = frozenset({429, 503})  # back-pressure and boundaries: the fabric said "not now"
# How the router's gRPC status codes map back onto its HTTP ones (services/router/grpc_api.py).
_GRPC_TO_HTTP = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
}


class LiveProgress(msgspec.Struct, kw_only=True):
    """Counts so far; the driver updates one instance and hands it to the callback on every change."""

    planned: int  # model calls in the plans
    done: int = 0  # calls answered, whatever the outcome
    ok: int = 0
    errors: int = 0
    rejected: int = 0
    skipped: int = 0  # calls never sent because an earlier step of their session failed
    in_flight: int = 0
    sessions_started: int = 0


class LiveRun(msgspec.Struct, kw_only=True):
    """What a run did.

    `max_start_lag_s`: how far behind its plan the latest-starting session began (more
    than a few milliseconds means this client, not the fabric, limited the load).
    `stopped_early`: the caller's stop event ended the run; calls cut off in flight have
    no record (the client, not the fabric, ended them).
    """

    records: list[RequestRecord]
    progress: LiveProgress
    wall_s: float
    max_start_lag_s: float
    stopped_early: bool = False


def _error_code(exc: openai.APIError) -> str:
    return str(exc.code or getattr(exc, "type", None) or type(exc).__name__)


class _Driver:
    def __init__(
        self,
        plans: Sequence[SessionPlan],
        clients: dict[str, openai.AsyncOpenAI],
        on_progress: Callable[[LiveProgress], None] | None,
        grpc_stub: Any = None,
    ) -> None:
        self._plans = sorted(plans, key=lambda p: p.start)
        self._clients = clients
        self._grpc = grpc_stub
        self._on_progress = on_progress
        self.progress = LiveProgress(planned=sum(len(p.calls) for p in plans))
        self.records: list[RequestRecord] = []
        self.max_start_lag_s = 0.0
        self._t0 = 0.0

    def _now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    def _changed(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.progress)

    async def run(self, stop: asyncio.Event | None) -> bool:
        """Every session, or until `stop` is set (then True: in-flight sessions are cancelled)."""
        self._t0 = asyncio.get_running_loop().time()
        schedule = asyncio.ensure_future(self._schedule())
        if stop is None:
            await schedule
            return False
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({schedule, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if schedule.done():
            stopped.cancel()
            schedule.result()  # a bug in a session surfaces here
            return False
        schedule.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await schedule
        return True

    async def _schedule(self) -> None:
        async with asyncio.TaskGroup() as sessions:
            for plan in self._plans:
                delay = plan.start - self._now()
                if delay > 0:
                    await asyncio.sleep(delay)
                sessions.create_task(self._session(plan))

    async def _session(self, plan: SessionPlan) -> None:
        self.max_start_lag_s = max(self.max_start_lag_s, self._now() - plan.start)
        self.progress.sessions_started += 1
        conversation = Conversation.for_plan(plan)
        for position, step in enumerate(plan.steps):
            if position and plan.think_s:
                await asyncio.sleep(plan.think_s)
            if isinstance(step, ToolPlan):
                await asyncio.sleep(step.latency_s)
                conversation.record(step, step.output_text)
                continue
            record, text = await self._call(plan, step, conversation)
            if record.outcome != "ok":
                self.progress.skipped += sum(isinstance(s, CallPlan) for s in plan.steps[position + 1 :])
                self._changed()
                return
            conversation.record(step, text)

    def _begin(self, plan: SessionPlan, step: CallPlan, conversation: Conversation) -> RequestRecord:
        """The call's record, stamped as sent now; it counts as in flight until `_answered`."""
        record = RequestRecord(
            request_id=f"{plan.session_id}-{step.index}", session_id=plan.session_key, tenant=plan.tenant, flow=plan.flow,
            step=step.index, model=step.model, sent_at=self._now(), prompt_tokens=conversation.prompt_tokens(step.system_text),
        )  # fmt: skip
        self.progress.in_flight += 1
        self._changed()
        return record

    async def _call(self, plan: SessionPlan, step: CallPlan, conversation: Conversation) -> tuple[RequestRecord, str]:
        if self._grpc is not None:
            return await self._call_grpc(plan, step, conversation)
        record = self._begin(plan, step, conversation)
        pieces: list[str] = []
        usage: Usage | None = None
        try:
            async with self._clients[plan.api_key].chat.completions.with_streaming_response.create(
                model=step.model, messages=conversation.messages(step.system_text), max_tokens=step.max_tokens,  # type: ignore[arg-type]
                stream=True, stream_options={"include_usage": True}, user=plan.session_key,
                extra_body={"ignore_eos": True, **({"service_tier": plan.request_class} if plan.request_class else {})},
                extra_headers={"x-tierflow-workload": plan.workload} if plan.workload else None,
            ) as response:  # fmt: skip
                record.request_id = response.headers.get("x-request-id") or record.request_id
                record.node = response.headers.get("x-tierflow-node", "")
                record.tier = response.headers.get("x-tierflow-tier", "")
                async for chunk in read_chunks(response.iter_bytes()):
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        if choice.delta.content:
                            if record.first_token_at is None:
                                record.first_token_at = self._now()
                            pieces.append(choice.delta.content)
            record.finished_at = self._now()
        except openai.APIStatusError as exc:
            record.status = exc.status_code
            record.outcome = "rejected" if exc.status_code in REJECTED_STATUSES else "error"
            record.error = _error_code(exc)
        except StreamError as exc:  # an error event after the 200: the stream broke mid-way
            record.outcome, record.error = "error", exc.code
        except (openai.APITimeoutError, httpx2.TimeoutException):
            record.outcome, record.status, record.error = "error", 0, "timeout"
        except openai.APIConnectionError:
            record.outcome, record.status, record.error = "error", 0, "connection"
        except openai.APIError as exc:
            record.outcome, record.error = "error", _error_code(exc)
        except httpx2.TransportError as exc:  # the connection broke mid-stream (openai wraps it only before the 200)
            record.outcome, record.error = "error", type(exc).__name__
        except asyncio.CancelledError:  # the run was stopped: this call has no outcome to record
            self.progress.in_flight -= 1
            raise
        text = "".join(pieces)
        if usage is not None:
            record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            details = usage.prompt_tokens_details
            record.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
        else:
            record.completion_tokens = count_tokens(text)
        self._answered(record)
        return record, text

    async def _call_grpc(self, plan: SessionPlan, step: CallPlan, conversation: Conversation) -> tuple[RequestRecord, str]:
        """The same call over `tierflow.v1.Inference/Generate` (a server stream). Its
        responses name the node but not the tier, so gRPC records leave `tier` unknown."""
        from tierflow.v1 import inference_pb2

        record = self._begin(plan, step, conversation)
        messages = [inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in conversation.messages(step.system_text)]
        request = inference_pb2.GenerateRequest(
            model=step.model, messages=inference_pb2.ChatMessages(messages=messages), max_tokens=step.max_tokens,
            ignore_eos=True, session_id=plan.session_key, user=plan.session_key,
        )  # fmt: skip
        metadata = [("authorization", f"Bearer {plan.api_key}")]
        if plan.workload:
            metadata.append(("x-tierflow-workload", plan.workload))
        if plan.request_class:
            metadata.append(("x-tierflow-class", plan.request_class))
        pieces: list[str] = []
        usage = None
        try:
            async for reply in self._grpc.Generate(request, metadata=metadata):
                if reply.text:
                    if record.first_token_at is None:
                        record.first_token_at = self._now()
                    pieces.append(reply.text)
                record.node = reply.node_id or record.node
                record.request_id = reply.id or record.request_id
                if reply.HasField("usage"):
                    usage = reply.usage
            record.finished_at = self._now()
        except grpc.aio.AioRpcError as exc:
            record.status = _GRPC_TO_HTTP.get(exc.code(), 500)
            record.outcome = "rejected" if record.status in REJECTED_STATUSES else "error"
            record.error = exc.code().name.lower()
        except asyncio.CancelledError:
            self.progress.in_flight -= 1
            raise
        text = "".join(pieces)
        if usage is not None:
            record.prompt_tokens, record.completion_tokens, record.cached_tokens = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        else:
            record.completion_tokens = count_tokens(text)
        self._answered(record)
        return record, text

    def _answered(self, record: RequestRecord) -> None:
        self.records.append(record)
        progress = self.progress
        progress.in_flight -= 1
        progress.done += 1
        if record.outcome == "ok":
            progress.ok += 1
        elif record.outcome == "rejected":
            progress.rejected += 1
        else:
            progress.errors += 1
        self._changed()


_WARM_CONNECTIONS = 16  # opened before the clock starts: a trace's first arrivals do not pay connection set-up


async def _open_connections(pool: httpx2.AsyncClient, base_url: str, count: int) -> None:
    """Open `count` keep-alive connections (concurrent GETs of /health) before the run's
    clock starts, as wrk connects before it measures: otherwise each of the first
    concurrent calls pays a TCP connect, and a replayed trace's arrivals come late by it.
    Best effort: a fabric without /health, or one that refuses, just starts cold."""
    health = base_url.rstrip("/").removesuffix("/v1") + "/health"

    async def one() -> None:
        try:
            await pool.get(health, timeout=5.0)
        except httpx2.HTTPError:
            pass

    await asyncio.gather(*(one() for _ in range(count)))


async def run_live(
    plans: Sequence[SessionPlan],
    *,
    base_url: str,
    on_progress: Callable[[LiveProgress], None] | None = None,
    stop: asyncio.Event | None = None,
    request_timeout_s: float = 300.0,
    max_connections: int = 4096,
    grpc_target: str | None = None,
    tls: TlsFiles | None = None,
) -> LiveRun:
    """Run every plan against `base_url` (e.g. http://127.0.0.1:8000/v1); one RequestRecord per call sent.

    Record times are seconds since the run's start. Calls are streamed chat completions
    with `ignore_eos` (exactly `max_tokens` come out), `user` = the plan's session (the router
    keeps a session on its node) and the tenant's api key; the tier and node come from the
    router's `x-tierflow-tier` / `x-tierflow-node` headers, cached tokens from the usage.
    No retries: a 429 or 503 is recorded as `rejected`, anything else that fails as `error`.
    Setting `stop` ends the run early (a Ctrl-C handler does), keeping what finished.
    With `grpc_target` ("host:port") the calls go over the router's gRPC Inference API on
    one channel instead (the node is in its replies; the tier is not, so it stays unknown).
    With `tls` (a `tierflow up --tls` fabric) both verify the servers against its CA.
    """
    size = max(1, min(len(plans), max_connections))
    pool = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=size, max_keepalive_connections=size), timeout=request_timeout_s,
                                          verify=client_ssl_context(tls) if tls is not None else True)  # fmt: skip
    clients = {
        key: openai.AsyncOpenAI(base_url=base_url, api_key=key, http_client=pool, max_retries=0, timeout=request_timeout_s)
        for key in {plan.api_key for plan in plans}
    }
    options = [("grpc.max_concurrent_streams", size)]
    if not grpc_target:
        channel = None
    elif tls is None:
        channel = grpc.aio.insecure_channel(grpc_target, options=options)
    else:
        channel = grpc.aio.secure_channel(grpc_target, grpc_channel_credentials(tls), options=options)
    stub = None
    if channel is not None:
        from tierflow.v1 import inference_pb2_grpc

        stub = inference_pb2_grpc.InferenceStub(channel)
    if channel is None:
        await _open_connections(pool, base_url, min(size, _WARM_CONNECTIONS))
    driver = _Driver(plans, clients, on_progress, stub)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        stopped_early = await driver.run(stop)
    finally:
        await pool.aclose()
        if channel is not None:
            await channel.close()
    return LiveRun(
        records=driver.records, progress=driver.progress, wall_s=loop.time() - started,
        max_start_lag_s=driver.max_start_lag_s, stopped_early=stopped_early,
    )  # fmt: skip


async def served_models(base_url: str, api_key: str, *, timeout_s: float = 10.0, tls: TlsFiles | None = None) -> set[str]:
    """The models `base_url` serves; raises openai.APIConnectionError when nothing answers there."""
    http = openai.DefaultAsyncHttpxClient(verify=client_ssl_context(tls)) if tls is not None else None
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s, http_client=http) as client:
        return {model.id async for model in client.models.list()}
