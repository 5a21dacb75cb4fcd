"""The load under the faults: agent sessions from a workload spec, streamed, every call checked.

The sessions are the project's own (`tierflow.workload`: a spec, `plan_sessions`, the
`Conversation` that grows each session's prompt, `chat_stream.read_chunks` for the SSE
body, the official `openai` client for the request), run the way `workload.live` runs
them: sessions open-loop at their planned times, steps closed-loop within a session, no
client retries. What this driver records beyond `live`'s `RequestRecord`, because a
fault suite needs it:

- a *total* deadline per call (`hang_timeout`): `live` bounds each read, so a stream that
  trickles keep-alives forever never times out there; here it is counted as hung;
- the completion's tokens counted in the text the client received (`count_tokens` of the
  deltas), beside the usage the router reports, and both against `max_tokens` (the calls
  send `ignore_eos`, so exactly that many must arrive): a resumed stream that lost or
  repeated a token shows up as `short`/`long`, never as ok;
- whether the call had its first token when it failed (what the issue's "must"s split on);
- wall-clock times (`time.time()`), the clock of the services' JSON logs, so a call joins
  its router `request` record by `x-request-id` and lands in the fault window it ran in;
- delivered tokens per wall second (`TokenBins`): the throughput timeline the recovery
  time is read from.

`Streamers` adds closed-loop streams on top (N workers, each calling back to back): the
"200 concurrent streams" the NATS outage is judged under.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import httpx2
import msgspec
import openai

from tierflow.tokenizer import count_tokens
from tierflow.workload.chat_stream import StreamError, read_chunks
from tierflow.workload.conversation import Conversation
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan

__all__ = ["CallRecord", "LoadDriver", "Streamers", "TokenBins", "make_client"]

Outcome = Literal["ok", "failed", "hung", "wrong_count", "cut"]


class CallRecord(msgspec.Struct, kw_only=True):
    """One call as its client saw it. Times are wall-clock seconds (`time.time()`).

    `error` is "" when ok, else one of: `http <status> <code>` (refused or failed before
    the stream began), `sse <code>` (an error event after the 200), `connection <Type>`
    (the TCP connection failed or broke), `hung` (no end within the hang timeout),
    `count <text>/<usage> of <max>` (the stream ended but not with max_tokens tokens),
    `cut` (the run ended and cancelled the call: neither ok nor the fabric's failure).
    """

    key: str  # session id + step, unique in a run
    source: str  # "session" or "streamer"
    model: str
    max_tokens: int
    sent: float
    request_id: str = ""  # the router's x-request-id (only once the response began)
    first: float | None = None
    done: float | None = None
    status: int = 0
    outcome: Outcome = "ok"
    error: str = ""
    detail: str = ""  # the error's message, as the fabric wrote it (for the report)
    text_tokens: int = 0
    usage_tokens: int | None = None
    retry_after: str | None = None  # the Retry-After header of a refusal

    @property
    def had_first_token(self) -> bool:
        return self.first is not None


class TokenBins:
    """Tokens delivered to clients per wall second (the throughput timeline)."""

    def __init__(self) -> None:
        self.bins: defaultdict[int, int] = defaultdict(int)

    def add(self, at: float, tokens: int) -> None:
        self.bins[int(at)] += tokens

    def series(self, start: float, end: float) -> list[tuple[int, int]]:
        return [(s, self.bins.get(s, 0)) for s in range(int(start), int(end) + 1)]


def make_client(base_url: str, connections: int, timeout: float) -> tuple[openai.AsyncOpenAI, httpx2.AsyncClient]:
    """One pool sized for every call in flight (no call waits for a connection), no retries."""
    pool = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections), timeout=timeout)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-faults", http_client=pool, max_retries=0, timeout=timeout)
    return client, pool


def _connection_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    return f"connection {type(cause).__name__}"


async def stream_call(
    client: openai.AsyncOpenAI, record: CallRecord, messages: list[dict[str, str]], *,
    hang_timeout: float, bins: TokenBins, user: str = "",
) -> str:
    """Run one streamed chat completion into `record`; returns the text received."""
    pieces: list[str] = []
    try:
        async with asyncio.timeout(hang_timeout):
            async with client.chat.completions.with_streaming_response.create(
                model=record.model, messages=messages, max_tokens=record.max_tokens, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, user=user or openai.NOT_GIVEN,
            ) as response:  # fmt: skip
                record.status = response.status_code
                record.request_id = response.headers.get("x-request-id", "")
                async for chunk in read_chunks(response.iter_bytes()):
                    if chunk.usage is not None:
                        record.usage_tokens = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        text = choice.delta.content
                        if text:
                            now = time.time()
                            if record.first is None:
                                record.first = now
                            pieces.append(text)
                            bins.add(now, count_tokens(text))
        record.done = time.time()
    except TimeoutError:
        record.outcome, record.error = "hung", "hung"
    except asyncio.CancelledError:
        record.outcome, record.error = "cut", "cut"
        raise
    except openai.APIStatusError as exc:
        record.status = exc.status_code
        record.retry_after = exc.response.headers.get("retry-after")
        record.outcome, record.error = "failed", f"http {exc.status_code} {exc.code or getattr(exc, 'type', '') or ''}".strip()
        record.detail = exc.message
    except StreamError as exc:
        record.outcome, record.error = "failed", f"sse {exc.code}"
        record.detail = str(exc)
    except (openai.APIConnectionError, httpx2.TransportError) as exc:  # before the 200 / mid-stream
        record.outcome, record.error = "failed", _connection_error(exc)
    except openai.APIError as exc:
        record.outcome, record.error = "failed", f"api {exc.code or type(exc).__name__}"
    text = "".join(pieces)
    record.text_tokens = count_tokens(text) if text else 0
    if record.outcome == "ok":
        counts = {record.text_tokens, record.usage_tokens if record.usage_tokens is not None else -1}
        if counts != {record.max_tokens}:
            record.outcome = "wrong_count"
            record.error = f"count {record.text_tokens}/{record.usage_tokens} of {record.max_tokens}"
    if record.done is None and record.outcome != "hung":
        record.done = time.time()
    return text


class LoadDriver:
    """Runs session plans until they end or `stop` is set, recording every call.

    Plans start at `t0 + plan.start` (wall clock). After `stop`, no session starts and no
    running session takes another step; calls in flight finish (or hang, and are counted).
    """

    def __init__(self, client: openai.AsyncOpenAI, plans: Sequence[SessionPlan], *, hang_timeout: float, bins: TokenBins) -> None:
        self._client = client
        self._plans = sorted(plans, key=lambda p: p.start)
        self._hang = hang_timeout
        self.bins = bins
        self.records: list[CallRecord] = []
        self.in_flight: dict[str, CallRecord] = {}
        self.sessions_started = 0

    async def run(self, stop: asyncio.Event, t0: float) -> None:
        sessions: set[asyncio.Task[None]] = set()
        for plan in self._plans:
            delay = t0 + plan.start - time.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
            if stop.is_set():
                break
            task = asyncio.create_task(self._session(plan, stop))
            sessions.add(task)
            task.add_done_callback(sessions.discard)
        if sessions:
            await asyncio.gather(*sessions)

    async def _session(self, plan: SessionPlan, stop: asyncio.Event) -> None:
        self.sessions_started += 1
        conversation = Conversation.for_plan(plan)
        for position, step in enumerate(plan.steps):
            if stop.is_set():
                return
            if position and plan.think_s:
                await asyncio.sleep(plan.think_s)
            if isinstance(step, ToolPlan):
                await asyncio.sleep(step.latency_s)
                conversation.record(step, step.output_text)
                continue
            assert isinstance(step, CallPlan)
            record = CallRecord(key=f"{plan.session_id}-{step.index}", source="session", model=step.model, max_tokens=step.max_tokens, sent=time.time())
            self.in_flight[record.key] = record
            try:
                text = await stream_call(self._client, record, conversation.messages(step.system_text), hang_timeout=self._hang, bins=self.bins, user=plan.session_key)
            finally:
                del self.in_flight[record.key]
                self.records.append(record)
            if record.outcome != "ok":
                return  # its history would lack the reply: the session ends, as in workload.live
            conversation.record(step, text)


class Streamers:
    """`n` closed-loop clients, each streaming one call after another until stopped.

    Prompts are short and unique per call; models rotate over `models`. Used to hold a
    known number of streams open (the NATS outage is judged under 200).
    """

    def __init__(self, client: openai.AsyncOpenAI, n: int, models: Sequence[str], *, max_tokens: int, hang_timeout: float, bins: TokenBins) -> None:
        self._client = client
        self._n = n
        self._models = list(models)
        self._max_tokens = max_tokens
        self._hang = hang_timeout
        self.bins = bins
        self.records: list[CallRecord] = []
        self.in_flight: dict[str, CallRecord] = {}
        self._counter = itertools.count()

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._worker(i, stop) for i in range(self._n)))

    async def _worker(self, worker: int, stop: asyncio.Event) -> None:
        await asyncio.sleep(worker * 0.01)  # spread the first calls over a moment
        while not stop.is_set():
            n = next(self._counter)
            model = self._models[n % len(self._models)]
            record = CallRecord(key=f"w{worker}-{n}", source="streamer", model=model, max_tokens=self._max_tokens, sent=time.time())
            self.in_flight[record.key] = record
            try:
                await stream_call(self._client, record, [{"role": "user", "content": f"stream {n} of worker {worker}: keep going"}],
                                  hang_timeout=self._hang, bins=self.bins)  # fmt: skip
            finally:
                del self.in_flight[record.key]
                self.records.append(record)
            if record.outcome != "ok":
                await asyncio.sleep(0.5)  # refused or failed: back off a little, as a client would
