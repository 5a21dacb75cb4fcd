"""Drives a pure `NodeEngine` in real time and turns its events into reply streams.

The engine says when it next has work (`next_event_time`); the driver sleeps until then
or until a request arrives, calls `advance(now)`, and publishes what happened. Tokens
emitted in one advance for the same request go out as one message, so a driver that
falls behind catches up in fewer, larger messages instead of queueing more of them.

Token coalescing (`coalesce_window`, `coalesce_tokens`): a stream's tokens go out at once
when its last `Tokens` message is at least `coalesce_window` old (so its first token,
and every token of a model slower than the window, is never delayed); otherwise they are
held until the window since that message has passed, or `coalesce_tokens` are held, or
the stream finishes (its `Finished` follows them at once). A fast model's stream then
costs one message per window instead of one per step, on the node, the router and the
client's connection. Times are the driver's clock, as the engine's.

It also keeps the node's own latency view (p95 TTFT and inter-token latency over a
sliding window, `load_report`) that the heartbeat carries to the autoscaler.

Streams end early in three ways besides the router's cancel, each freeing the request's
batch slot and KV at once: its deadline (`GenerateRequest.timeout_s`) passes; its router
is gone (silent, see `RouterLiveness`); or a message to it cannot be published (NATS is
down and the client's buffer full). A stream with a message missing is broken whatever
follows, so the driver drops it rather than send tokens after a gap; the router sees the
gap or the silence and resumes the generation elsewhere. Nothing the driver publishes
can raise out of it: the engine keeps running through a NATS outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry.trace import Span, StatusCode

from tierflow.contracts import messages, subjects
from tierflow.nodehost.beat import LoadReport
from tierflow.nodehost.routers import RouterLiveness
from tierflow.nodehost.stops import StopMatcher
from tierflow.rdu import (
    EngineRequest,
    kv_transfer_time,
    NodeEngine,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TokenGenerated,
)
from tierflow.runtime.clock import Clock
from tierflow.scaling.window import RollingQuantile

__all__ = ["EngineDriver", "LoadReport", "Publish", "DROP_REASONS"]

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes], Awaitable[None]]
_encode = messages.encoder.encode
# Why the driver ended a stream on its own (for the node's metrics and log).
DROP_REASONS = ("deadline_exceeded", "router_gone", "publish_failed")


@dataclass(slots=True)
class _Stream:
    request_id: str
    reply: str
    model: str
    received_at: float
    last_sent: float
    started: bool = False
    first_token_at: float = 0.0
    tokens: int = 0
    queue_time: float = 0.0
    tier: str = ""
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0  # to prefill here (0 when a prefill node already did it)
    last_token_at: float = 0.0
    router: str | None = None  # the router reading the reply subject, when it is one of ours
    deadline: float = math.inf
    # Tokens not sent yet (coalescing): the first one's index, the ids, their texts.
    held_index: int = 0
    held_ids: list[int] = field(default_factory=list)
    held_text: list[str] = field(default_factory=list)
    tokens_sent_at: float = -math.inf  # when its last Tokens message went out
    stops: StopMatcher | None = None  # the request's stop strings (stops.py), if any
    prompt_len: int = 0  # the prompt proper, for a Finished the driver makes (a stop string)
    span: Span | None = None  # the request's node span (only when traces are exported): ended with the stream
    request_class: str = "standard"  # where it queued (the engine's fair queuing); the node's metrics are per class


def _end_span(span: Span | None, error: str = "", finished: messages.Finished | None = None) -> None:
    """End a request's node span: after its last token (`finished`), or at its refusal,
    drop or cancel (`error`, the span's `error.type`)."""
    if span is None:
        return
    if finished is not None:
        span.set_attribute("gen_ai.usage.output_tokens", finished.completion_tokens)
        span.set_attribute("gen_ai.usage.cache_read.input_tokens", finished.cached_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [finished.finish_reason])
    if error:
        span.set_attribute("error.type", error)
        span.set_status(StatusCode.ERROR)
    span.end()


class EngineDriver:
    def __init__(
        self,
        engine: NodeEngine,
        clock: Clock,
        publish: Publish,
        node_id: str,
        *,
        keepalive_interval: float = 0.25,
        on_finished: Callable[[str, "_Stream", messages.Finished, float], None] | None = None,
        on_switch: Callable[[], None] | None = None,
        on_dropped: Callable[[str, str, str], None] | None = None,
        routers: RouterLiveness | None = None,
        latency_window: float = 10.0,
        coalesce_window: float = 0.003,
        coalesce_tokens: int = 64,
    ) -> None:
        """`on_dropped(request_id, model, reason)`: the driver ended a stream itself, one of
        `DROP_REASONS`. `routers`: whose presence the node hears (None: never judge).
        `coalesce_window` seconds (0: off) and `coalesce_tokens`: see the module docstring."""
        if coalesce_window < 0 or coalesce_tokens < 1:
            raise ValueError("coalesce_window >= 0 and coalesce_tokens >= 1")
        self.engine = engine
        self._clock = clock
        self._publish = publish
        self._node_id = node_id
        self._keepalive = keepalive_interval
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._on_finished = on_finished
        self._ttft = RollingQuantile(latency_window)
        self._itl = RollingQuantile(latency_window)
        self._on_switch = on_switch
        self._on_dropped = on_dropped
        self._routers = routers
        self._window = coalesce_window
        self._max_held = coalesce_tokens
        self._held: dict[str, _Stream] = {}  # streams holding tokens, by request id
        # Streams submitted since the last turn: the turn's Started stands for their
        # Accepted, which goes out only for those still queued (see `_announce`).
        self._unannounced: list[_Stream] = []
        # Deadlines, router silence and keep-alives are checked over every stream at most
        # this often, not every loop turn (a turn per decode step, or per arrival).
        self._tend_every = keepalive_interval / 5
        self._next_tend = -math.inf

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def load_report(self, now: float) -> LoadReport:
        """p95 latencies over the window ending at `now`, and the work this node holds."""
        return LoadReport(
            ttft_p95=self._ttft.value(now),
            itl_p95=self._itl.value(now),
            latency_samples=self._ttft.count(now),
            latency_window=self._ttft.window,
            in_flight=len(self._streams),
            queued_prompt_tokens=sum(s.prompt_tokens for s in self._streams.values() if not s.started),
        )

    async def submit(self, request: messages.GenerateRequest, reply: str, span: Span | None = None) -> None:
        """Queue a request, or answer at once with why it cannot be served. `span`, the
        request's node span, ends with its stream (after the last token) or its refusal.

        A request whose KV was computed by a prefill node (`kv_source`) first waits for
        that KV to cross the link between the nodes, at the profile's inter-node
        bandwidth; the engine then charges only its write into HBM.
        """
        now = self._clock.monotonic()
        existing = self._streams.get(request.request_id)
        if existing is not None:
            if existing.reply == reply:
                await self._send_once(reply, messages.Failed(request_id=request.request_id, code="duplicate_request", message="a request with this id is already in flight on this node", retryable=False))
                _end_span(span, "duplicate_request")
                return
            # The router resumed this request on a new attempt (its own reply subject): it has
            # given up on the old stream, whose cancel may have been lost with our link.
            self._drop(request.request_id, "superseded", "the router resumed it on a new attempt")
        resumed = request.resume_token_ids
        prompt = request.prompt_token_ids + resumed if resumed else request.prompt_token_ids
        engine_request = EngineRequest(
            request_id=request.request_id,
            model=request.model,
            prompt_token_ids=prompt,
            max_tokens=request.max_tokens,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            prefilled=bool(request.kv_source),
            resume_from=len(resumed),
            output_token_ids=request.output_token_ids or None,
            request_class=request.request_class,
            tenant=request.tenant,
            tenant_weight=request.tenant_weight,
        )
        transfer = self._kv_transfer_seconds(request, len(prompt)) if request.kv_source else 0.0
        if transfer <= 0 and not await self._admit(engine_request, reply, now):
            _end_span(span, "rejected")
            return
        stream = self._streams[request.request_id] = _Stream(
            request_id=request.request_id, reply=reply, model=request.model, received_at=now, last_sent=now,
            prompt_tokens=0 if request.kv_source else len(prompt),
            router=subjects.router_of_reply(reply),
            deadline=now + request.timeout_s if request.timeout_s > 0 else math.inf, span=span,
            stops=StopMatcher(request.stop) if request.stop else None, prompt_len=len(request.prompt_token_ids),
            request_class=request.request_class,
        )
        self._unannounced.append(stream)
        if transfer > 0:
            asyncio.get_running_loop().call_later(transfer, lambda: asyncio.ensure_future(self._admit_arrived(engine_request, reply)))
        self._wake.set()

    def _kv_transfer_seconds(self, request: messages.GenerateRequest, tokens: int) -> float:
        spec = next((b.spec for b in self.engine.bundle if b.spec.name == request.model), None)
        return kv_transfer_time(spec, self.engine.profile, tokens) if spec is not None else 0.0

    async def _admit(self, engine_request: EngineRequest, reply: str, now: float) -> bool:
        try:
            self.engine.submit(engine_request, now)
        except RequestRejected as rejected:
            retryable = rejected.code in ("queue_full", "model_not_in_bundle", "draining")
            await self._send_once(reply, messages.Failed(request_id=engine_request.request_id, code=rejected.code, message=rejected.message, retryable=retryable))
            return False
        return True

    async def _send_once(self, reply: str, message: messages.StreamEvent) -> None:
        """A reply outside any stream (a refusal): if it cannot go out, the router's
        liveness timeout tells it as much, so a failure is only logged."""
        try:
            await self._publish(reply, _encode(message))
        except Exception as exc:  # NATS down: nats-py raises several unrelated types
            log.warning("could not answer %s: %s", getattr(message, "request_id", ""), exc)

    async def _send(self, request_id: str, stream: _Stream, message: messages.StreamEvent) -> bool:
        """Publish one message of a stream; on failure the stream is broken (its reader
        would see a gap), so it is dropped at once and its slot freed. False if dropped."""
        try:
            await self._publish(stream.reply, _encode(message))
        except Exception as exc:
            self._drop(request_id, "publish_failed", f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _drop(self, request_id: str, reason: str, detail: str = "") -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._held.pop(request_id, None)
        self.engine.cancel(request_id, self._clock.monotonic())
        self._wake.set()
        _end_span(stream.span, reason)
        log.warning("dropped %s: %s%s", request_id, reason, f" ({detail})" if detail else "",
                    extra={"fields": {"request_id": request_id, "model": stream.model, "reason": reason, "tokens_sent": stream.tokens}})  # fmt: skip
        if self._on_dropped is not None:
            self._on_dropped(request_id, stream.model, reason)

    async def _admit_arrived(self, engine_request: EngineRequest, reply: str) -> None:
        """The transferred KV has arrived: the request joins the engine now (if still wanted)."""
        if engine_request.request_id not in self._streams:
            return  # cancelled while its KV was in transit
        if await self._admit(engine_request, reply, self._clock.monotonic()):
            self._wake.set()
        else:
            stream = self._streams.pop(engine_request.request_id, None)
            _end_span(stream.span if stream is not None else None, "rejected")

    def cancel(self, request_id: str) -> None:
        self._held.pop(request_id, None)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self.engine.cancel(request_id, self._clock.monotonic())  # a no-op if it never reached the engine
            self._wake.set()
            _end_span(stream.span, "cancelled")

    async def fail_all(self, code: str, message: str, *, retryable: bool) -> None:
        """Tell every requester this node will not finish its request (shutdown). A stream
        with tokens out is retryable too: the router resumes it elsewhere from what it has."""
        now = self._clock.monotonic()
        streams = list(self._streams.items())
        self._streams.clear()
        self._held.clear()
        self._unannounced.clear()
        for request_id, stream in streams:
            self.engine.cancel(request_id, now)
            await self._send_once(stream.reply, messages.Failed(request_id=request_id, code=code, message=message, retryable=retryable))
            _end_span(stream.span, code)

    async def run(self, stopping: asyncio.Event) -> None:
        """Turn after turn until `stopping`: each `tick`, then wait for its answer or a
        wake-up (a request arrived, a stream was cancelled)."""
        loop = asyncio.get_running_loop()
        wake = self._wake
        clock = self._clock
        while not stopping.is_set():
            wait = await self.tick() - clock.monotonic()
            if wait > 0:
                # An Event and a timer, not asyncio.wait_for (a task per turn).
                wake.clear()
                timer = loop.call_later(wait, wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
            else:
                await asyncio.sleep(0)  # let NATS I/O run between back-to-back steps

    async def tick(self) -> float:
        """One turn at the clock's now: run the engine up to it, publish what happened and
        the held tokens now due, tend the streams; returns when the next turn is due
        (the engine's next event, held tokens' release, or a keep-alive check)."""
        now = self._clock.monotonic()
        events = self.engine.advance(now)
        if events:
            await self._dispatch(events, now)
        if self._unannounced:
            await self._announce()
        until = await self._flush_held(now) if self._held else math.inf
        if now >= self._next_tend:
            self._next_tend = now + self._tend_every
            await self._tend(now)
        if now + self._keepalive < until:
            until = now + self._keepalive
        due = self.engine.next_event_time()
        if due is not None and due < until:
            until = due
        return until

    async def _dispatch(self, events: list[object], now: float) -> None:
        streams = self._streams
        held = self._held
        token_event = TokenGenerated
        for event in events:
            if type(event) is token_event:
                stream = streams.get(event.request_id)  # type: ignore[attr-defined]
                if stream is None:
                    continue
                t = event.time  # type: ignore[attr-defined]
                if stream.tokens == 0:
                    stream.first_token_at = t
                    self._ttft.observe(t, max(0.0, t - stream.received_at))
                else:
                    self._itl.observe(t, max(0.0, t - stream.last_token_at))
                stream.last_token_at = t
                stream.tokens += 1
                if not stream.held_ids:
                    stream.held_index = event.index  # type: ignore[attr-defined]
                    held[stream.request_id] = stream
                stream.held_ids.append(event.token_id)  # type: ignore[attr-defined]
                if stream.stops is None:
                    stream.held_text.append(event.text)  # type: ignore[attr-defined]
                    continue
                text, hit = stream.stops.feed(event.text)  # type: ignore[attr-defined]
                stream.held_text.append(text)
                if hit:
                    await self._stopped(stream, event.index + 1, now, t)  # type: ignore[attr-defined]
                continue
            request_id = getattr(event, "request_id", "")
            stream = streams.get(request_id)
            if stream is None:
                continue
            if stream.stops and isinstance(event, RequestFinished) and stream.stops.pending:
                if not stream.held_ids:  # the text held back goes out with no token of its own
                    stream.held_index = stream.tokens
                    held[request_id] = stream
                stream.held_text.append(stream.stops.flush())
            # Tokens go out before a lifecycle event of the same request keeps order.
            if stream.held_ids or stream.held_text:
                del held[request_id]
                await self._flush_tokens(stream, now)
            if isinstance(event, RequestStarted):
                if event.tier != "hbm" and self._on_switch is not None:
                    self._on_switch()  # weights move (and others may be evicted): tell the router now
                stream.started = True
                stream.queue_time = event.queue_time
                stream.tier = event.tier
                stream.prefix_hit_tokens = event.prefix_hit_tokens
                msg: messages.StreamEvent = messages.Started(request_id=request_id, queue_time=event.queue_time, tier=event.tier, switch_seconds=event.switch_seconds, prefix_hit_tokens=event.prefix_hit_tokens)
            elif isinstance(event, RequestFinished):
                del streams[request_id]
                if stream.tokens == 0 and event.finish_reason == "prefill":  # a prefill node's "first token": its KV
                    self._ttft.observe(event.time, max(0.0, event.time - stream.received_at))
                msg = messages.Finished(
                    request_id=request_id,
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    cached_tokens=event.cached_prompt_tokens,
                    energy_j=event.energy_j,
                )
                if self._on_finished is not None:
                    self._on_finished(request_id, stream, msg, event.time)
            else:
                continue
            stream.last_sent = now
            await self._send(request_id, stream, msg)
            if stream.span is not None and type(msg) is messages.Finished:  # its last token is out
                _end_span(stream.span, finished=msg)
                stream.span = None

    async def _announce(self) -> None:
        """Accepted for each stream submitted since the last turn that did not start in
        this one. A request that starts at once needs none (its Started, in the same
        socket write as its first tokens, proves the node has it: the router reads both
        only as proof of life); one that waits gets it now, within a loop turn of its
        arrival, so the router's liveness watch hears from the node before keep-alives
        take over. One message and one socket write fewer per request (issue 16)."""
        fresh, self._unannounced = self._unannounced, []
        streams = self._streams
        for stream in fresh:
            request_id = stream.request_id
            if stream.started or streams.get(request_id) is not stream:
                continue  # started (Started went out), or finished, dropped or superseded
            await self._send(request_id, stream, messages.Accepted(request_id=request_id, node_id=self._node_id))

    async def _stopped(self, stream: _Stream, completion_tokens: int, now: float, t: float) -> None:
        """A stop string appeared: the tokens up to it go out, the engine drops the rest of
        the request, and the stream ends as the engine would have ended it ("stop")."""
        request_id = stream.request_id
        del self._streams[request_id]
        self._held.pop(request_id, None)
        energy = self.engine.energy_of(request_id)
        self.engine.cancel(request_id, now)
        self._wake.set()
        await self._flush_tokens(stream, now)
        msg = messages.Finished(
            request_id=request_id, finish_reason="stop", prompt_tokens=stream.prompt_len,
            completion_tokens=completion_tokens, cached_tokens=stream.prefix_hit_tokens, energy_j=energy,
        )
        if self._on_finished is not None:
            self._on_finished(request_id, stream, msg, t)
        await self._send(request_id, stream, msg)
        _end_span(stream.span, finished=msg)
        stream.span = None

    async def _flush_held(self, now: float) -> float:
        """Send the held tokens that are due (see the module docstring); returns when the
        next of the others is (inf: none held)."""
        window = self._window
        most = self._max_held
        nxt = math.inf
        due = []
        for stream in self._held.values():
            release = stream.tokens_sent_at + window
            if release <= now or len(stream.held_ids) >= most:
                due.append(stream)
            elif release < nxt:
                nxt = release
        for stream in due:
            del self._held[stream.request_id]
            await self._flush_tokens(stream, now)
        return nxt

    async def _flush_tokens(self, stream: _Stream, now: float) -> None:
        """One Tokens message with every token `stream` holds (the caller took it off `_held`)."""
        ids, texts = stream.held_ids, stream.held_text
        stream.held_ids, stream.held_text = [], []
        stream.last_sent = stream.tokens_sent_at = now
        request_id = stream.request_id
        await self._send(request_id, stream, messages.Tokens(request_id=request_id, index=stream.held_index, token_ids=ids, text="".join(texts)))

    async def _tend(self, now: float) -> None:
        """Once per loop turn over every stream: keep-alives to the quiet ones, and the
        end of the ones whose deadline passed or whose router is gone."""
        routers = self._routers
        ended: list[tuple[str, str]] = []
        quiet: list[tuple[str, _Stream]] = []
        for request_id, stream in self._streams.items():
            if now >= stream.deadline:
                ended.append((request_id, "deadline_exceeded"))
            elif routers is not None and routers.gone(stream.router, now):
                ended.append((request_id, "router_gone"))
            elif now - stream.last_sent >= self._keepalive:
                quiet.append((request_id, stream))
        for request_id, reason in ended:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            self._drop(request_id, reason)
            if reason == "deadline_exceeded":
                await self._send_once(stream.reply, messages.Failed(
                    request_id=request_id, code=reason, retryable=False,
                    message=f"the request's deadline passed on node {self._node_id} after {now - stream.received_at:.1f}s; the work was dropped",
                ))  # fmt: skip
        for request_id, stream in quiet:
            if request_id in self._streams:
                stream.last_sent = now
                await self._send(request_id, stream, messages.Alive(request_id=request_id))
