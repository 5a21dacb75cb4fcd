"""A virtual node: the emulator's `NodeEngine` plus what the decode-node shell adds to it.

What `tierflow.nodehost` does around the engine in a live node, done here in virtual
time and in the same order, so the router and the autoscaler see the same node:

- a request joins the engine with its class, tenant and tenant weight (`Call.request_class`,
  `Call.tenant`), as the driver passes a `GenerateRequest`'s, so the engine's fair queuing
  (`tierflow.rdu.fairness`) treats a simulated tenant as a live one;
- a cordoned node refuses new work as retryable ("node_cordoned"), and the engine's own
  refusals are retryable exactly when the driver says so (queue_full, model_not_in_bundle,
  draining);
- a request whose KV comes from a prefill node is held for the transfer over the link
  between the nodes (`rdu.kv_transfer_time`) before it joins the engine;
- the node's own latency view (`LoadReport`): p95 time to first token from arrival on the
  node, and p95 inter-token latency, over a sliding window, as the driver keeps them;
- a request that starts with a weight switch asks for a heartbeat at once (`beat_now`),
  as the driver's `on_switch` does, so the router learns of the move before the next beat;
- the heartbeat itself is `tierflow.nodehost.beat.build_heartbeat`, shared with live nodes;
- its KV-cache events are `tierflow.nodehost.kv_events.KvEventFeed`'s messages, as a live
  node publishes them (a snapshot at start, then changes; no periodic snapshots: nothing
  is lost in process), for the router's prefix index (issue 17).

With the engine's per-token events off (the simulator's default), a request's gaps
between tokens come with its finish, counted in the engine's fixed buckets
(`RequestFinished.itl_buckets`, `tierflow.rdu.itl`), and the window keeps those counts
(`RollingHistogram`): its p95 is the per-token p95 the live driver reports, to a bucket's
width (2.2%), except that a request's gaps enter the window when it finishes rather than
as they happen.
"""

from __future__ import annotations

from typing import Final

import msgspec

from tierflow.contracts import messages
from tierflow.nodehost.beat import LoadReport, NodeIdentity, build_heartbeat
from tierflow.nodehost.kv_events import KvEventFeed
from tierflow.nodehost.preload import preload_models
from tierflow.rdu import EngineEvent, EngineRequest, NodeEngine, RequestFinished, RequestRejected, RequestStarted, TokenGenerated, kv_transfer_time
from tierflow.scaling.window import RollingHistogram, RollingQuantile
from tierflow.sim.calls import Call
from tierflow.sim.fleet import DeploymentPlan

__all__ = ["SimNode", "NodeFailure", "LATENCY_WINDOW_S"]

LATENCY_WINDOW_S: Final = 10.0  # the driver's default window for its p95s
_RETRYABLE: Final = frozenset({"queue_full", "model_not_in_bundle", "draining"})  # as the driver marks engine refusals


class NodeFailure(Exception):
    """The node refused or dropped a request (a `messages.Failed` in a live node)."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class _Stream:
    """A request the node holds, from arrival until it finishes (the driver's `_Stream`)."""

    __slots__ = ("call", "received_at", "prompt_tokens", "started", "first_token_at", "tokens", "last_token_at")

    def __init__(self, call: Call, received_at: float, prompt_tokens: int) -> None:
        self.call = call
        self.received_at = received_at
        self.prompt_tokens = prompt_tokens  # to prefill here; 0 when a prefill node did it
        self.started = False
        self.first_token_at = 0.0
        self.tokens = 0
        self.last_token_at = 0.0


class SimNode:
    """One node of a deployment in one role ("decode" or "prefill")."""

    __slots__ = (
        "identity", "plan", "engine", "token_events", "streams", "ttft", "itl", "seq", "up_at", "stopped_at",
        "beat_due", "wake_due", "switched", "busy_seconds", "last_beat", "dirty", "kv_feed",
    )  # fmt: skip

    def __init__(self, plan: DeploymentPlan, role: str, node_id: str, now: float, *, token_events: bool = False, kv_events: bool = False) -> None:
        """A node that is up at `now` with `preload_models` of its bundle in HBM (what a
        live node does at start; the time that load takes is `fleet.start_delay`).
        `kv_events`: its KV cache's changes are read by `kv_events`."""
        record = plan.record
        preload = preload_models(plan.profile, plan.bundle, node_id)
        self.identity = NodeIdentity(
            node_id=node_id, role=role, deployment=record.name, region=record.region,
            residency=record.residency, profile=plan.profile.name, started_at=now,
        )  # fmt: skip
        self.plan = plan
        self.engine = NodeEngine(plan.profile, plan.bundle, now=now, preload=preload, token_events=token_events, kv_events=kv_events)
        self.kv_feed = KvEventFeed(node_id, now, snapshot_every=0.0) if kv_events else None
        self.token_events = token_events
        self.streams: dict[str, _Stream] = {}
        self.ttft = RollingQuantile(LATENCY_WINDOW_S)
        self.itl: RollingQuantile | RollingHistogram = RollingQuantile(LATENCY_WINDOW_S) if token_events else RollingHistogram(LATENCY_WINDOW_S)
        self.seq = 0
        self.up_at = now
        self.stopped_at: float | None = None
        self.beat_due = 0.0  # when the next regular heartbeat is due (the event loop's bookkeeping)
        self.wake_due: float | None = None  # when the engine next has work, as last scheduled
        self.switched = False  # a weight switch began since the last heartbeat: beat now
        self.busy_seconds = 0.0  # the engine's busy time as of the last heartbeat
        self.last_beat: messages.NodeHeartbeat | None = None
        self.dirty = True  # something a heartbeat reports may have changed since the last one

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    def cordon(self, cordoned: bool) -> None:
        """Drain (cordon, and say it is draining) or take back, as the control endpoint does."""
        self.identity.cordoned = self.identity.draining = cordoned
        self.dirty = True

    # -- requests ---------------------------------------------------------------------
    def receive(self, call: Call, now: float, *, kv_from: str = "") -> float:
        """A request arrives; returns the seconds its KV takes to arrive from `kv_from`
        (0 when there is none: it joined the engine already). Raises NodeFailure."""
        self.dirty = True
        if self.identity.cordoned:  # sent before the router saw the cordon: let it go elsewhere
            raise NodeFailure("node_cordoned", f"node {self.node_id} is cordoned", retryable=True)
        if call.request_id in self.streams:
            raise NodeFailure("duplicate_request", "a request with this id is already in flight on this node", retryable=False)
        transfer = self._kv_transfer_seconds(call) if kv_from else 0.0
        if transfer <= 0:
            self._admit(call, now, prefilled=bool(kv_from))
        self.streams[call.request_id] = _Stream(call, now, 0 if kv_from else call.prompt_tokens)
        return transfer

    def kv_arrived(self, call: Call, now: float) -> None:
        """The transferred KV is here: the request joins the engine (or fails: NodeFailure)."""
        if call.request_id not in self.streams:
            return
        self.dirty = True
        try:
            self._admit(call, now, prefilled=True)
        except NodeFailure:
            del self.streams[call.request_id]
            raise

    def _admit(self, call: Call, now: float, *, prefilled: bool) -> None:
        max_tokens = 0 if self.identity.role == "prefill" else call.max_tokens
        tenant = call.tenant  # queued by class, then by tenant and weight, as the driver passes them
        request = EngineRequest(
            request_id=call.request_id, model=call.model, max_tokens=max_tokens, ignore_eos=True, prefilled=prefilled,
            prompt_token_ids=call.engine_prompt(),  # type: ignore[arg-type]  # a PromptLength without token events: see there
            prompt_block_hashes=call.prompt_hashes, request_class=call.request_class,
            tenant=tenant.name if tenant is not None else "", tenant_weight=tenant.weight if tenant is not None else 1.0,
        )  # fmt: skip
        try:
            self.engine.submit(request, now)
        except RequestRejected as rejected:
            raise NodeFailure(rejected.code, rejected.message, retryable=rejected.code in _RETRYABLE) from None

    def _kv_transfer_seconds(self, call: Call) -> float:
        spec = next((b.spec for b in self.plan.bundle if b.spec.name == call.model), None)
        return kv_transfer_time(spec, self.plan.profile, call.prompt_tokens) if spec is not None else 0.0

    def advance(self, now: float) -> list[tuple[EngineEvent, _Stream]]:
        """Run the engine up to `now`; the starts and finishes of the requests this node
        holds, in order, after the node's own bookkeeping (latency windows, the switch beat).

        A stream's `first_token_at` is set when its request starts. With per-token events
        on it is the first token's own time. Without them it is the end of the prefill the
        request started in: the event loop advances a node exactly when its work is due,
        so a request that starts at `now` starts in the work now pending, whose end
        (`next_event_time`) is when its first token comes out. (Only a prefill that takes
        no time at all, on the "zero" profile, would end before another work begins at the
        same instant.)
        """
        self.dirty = True
        out: list[tuple[EngineEvent, _Stream]] = []
        streams = self.streams
        fast = not self.token_events
        started: list[_Stream] = []
        for event in self.engine.advance(now):
            stream = streams.get(event.request_id)
            if stream is None:
                continue
            kind = type(event)
            if kind is TokenGenerated:
                if stream.tokens == 0:
                    stream.first_token_at = event.time
                    self.ttft.observe(event.time, max(0.0, event.time - stream.received_at))
                else:
                    self.itl.observe(event.time, max(0.0, event.time - stream.last_token_at))  # type: ignore[arg-type]
                stream.last_token_at = event.time
                stream.tokens += 1
                continue
            if kind is RequestStarted:
                if event.tier != "hbm":
                    self.switched = True
                stream.started = True
                stream.first_token_at = event.time
                if fast and self.identity.role == "decode":
                    started.append(stream)
            elif kind is RequestFinished:
                del streams[event.request_id]
                if fast and event.completion_tokens == 1:
                    stream.first_token_at = event.time  # its prefill ended with its one token
                self._observe_finish(event, stream)
            out.append((event, stream))
        if started:
            due = self.engine.next_event_time()
            for stream in started:
                if stream.first_token_at == now and due is not None and stream.call.request_id in streams:
                    stream.first_token_at = due
                stream.tokens = 1
                self.ttft.observe(stream.first_token_at, stream.first_token_at - stream.received_at)
        return out

    def _observe_finish(self, event: RequestFinished, stream: _Stream) -> None:
        if event.finish_reason == "prefill":  # a prefill node's "first token": its KV
            self.ttft.observe(event.time, max(0.0, event.time - stream.received_at))
        elif not self.token_events and event.itl_buckets:
            # Per-token events are off: this request's gaps, counted by the engine (module docstring).
            self.itl.observe(event.time, event.itl_buckets)  # type: ignore[arg-type]

    def fail_all(self, now: float) -> list[_Stream]:
        """The node stops with requests still on it: they end here (the shell's `fail_all`)."""
        self.dirty = True
        dropped = list(self.streams.values())
        for stream in dropped:
            self.engine.cancel(stream.call.request_id, now)
        self.streams.clear()
        return dropped

    def kv_events(self, now: float) -> list[messages.KvEvents]:
        """The KV-event messages a live node would publish now (none without `kv_events`)."""
        feed = self.kv_feed
        return feed.poll(self.engine, now) if feed is not None else []

    # -- heartbeats -------------------------------------------------------------------
    def load_report(self, now: float) -> LoadReport:
        return LoadReport(
            ttft_p95=self.ttft.value(now),
            itl_p95=self.itl.value(now),
            latency_samples=self.ttft.count(now),
            latency_window=self.ttft.window,
            in_flight=len(self.streams),
            queued_prompt_tokens=sum(s.prompt_tokens for s in self.streams.values() if not s.started),
        )

    def heartbeat(self, now: float, interval: float) -> tuple[messages.NodeHeartbeat, bool]:
        """The node's heartbeat at `now`, and whether it repeats the last one.

        Between two heartbeats of an untouched node (no request arrived, the engine did
        no work, the identity did not change) nothing in the engine's snapshot can have
        changed, so the last heartbeat is reused with a fresh sequence number, time and
        latency window; the engine is asked only when something happened.
        """
        self.seq += 1
        self.switched = False
        last = self.last_beat
        unchanged = not self.dirty and last is not None and last.interval_s == interval
        if not unchanged:
            self.dirty = False
            snap = self.engine.snapshot(now, node_hashes=False)  # `build_heartbeat` sends the per-model lists only
            self.busy_seconds = snap.busy_seconds
            self.last_beat = build_heartbeat(self.identity, snap, self.load_report(now), seq=self.seq, interval=interval, sent_at=now)
        elif self.ttft.count(now) or self.itl.count(now) or last.latency_samples:
            ttft, itl = self.ttft, self.itl
            self.last_beat = msgspec.structs.replace(
                last, seq=self.seq, sent_at=now, ttft_p95=ttft.value(now), itl_p95=itl.value(now), latency_samples=ttft.count(now),
            )  # fmt: skip
        else:  # no latency sample in the window, now or last time: only the beat's own fields change
            self.last_beat = msgspec.structs.replace(last, seq=self.seq, sent_at=now)
        return self.last_beat, unchanged
