"""The router's port to the nodes (`NodeTransport`) and its NATS adapter.

All reply streams of one router arrive on a single wildcard subscription and are
demultiplexed by request id into per-request queues: one subscription per process,
not one per request (the pattern of nats-py's own request mux, extended to streams).

A stream ends in one of three ways the caller can tell apart: the node's `Finished`,
the node's `Failed`, or `NodeLost` (nobody listens on the node's subject, or the node
fell silent longer than the liveness timeout: keep-alives come every 250 ms).

Silence is the node's, not the router's: when this process's own event loop was stalled
(a big request being parsed, a GC pause), the timer that says "silent" fires late, before
the loop has read what the node sent meanwhile. A wait that ends late therefore gets one
more window to read its socket before the node is called lost.

No timer per message: a stream that waits records when its silence would become too long
and parks a future; a message resolves the future directly, and one sweep per transport
(every `_TICK` while anything waits) ends the waits whose time has passed. An
`asyncio.wait_for` per message (a task, a timer and their cancellation) was several
percent of the router's CPU at load (issue 16).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Mapping
from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tierflow.contracts import messages, subjects

__all__ = ["NodeLost", "NodeStream", "NodeTransport", "NatsNodeTransport"]

log = logging.getLogger(__name__)
_decode_event = messages.stream_decoder.decode
_encode = messages.encoder.encode
# A wait that ends this much after its timeout means our own loop was stalled.
_STALL = 0.1
# How often waits are checked for silence: well under _STALL, so the sweep's own
# granularity never looks like a stall.
_TICK = 0.025


class NodeLost(Exception):
    """The node did not answer, or stopped answering, on this request's stream.

    `ours` is true when the silence was this router's: its own NATS connection broke
    meanwhile (a member of the cluster died), so whatever the node sent was lost on the
    way and the node itself is not suspect: the stream moves on, the node keeps its name.
    """

    def __init__(self, node_id: str, reason: str, *, ours: bool = False) -> None:
        super().__init__(f"node {node_id}: {reason}")
        self.node_id = node_id
        self.reason = reason
        self.ours = ours


class NodeStream(Protocol):
    node_id: str
    # True when the router's own link broke between the last two messages (a gap is
    # then the link's, not the node's).
    link_broke: bool

    async def next(self) -> messages.StreamEvent: ...
    def buffered(self) -> bool: ...  # a message is here already: next() returns without waiting
    async def cancel(self) -> None: ...
    def close(self) -> None: ...


class NodeTransport(Protocol):
    async def open(self, node_id: str, request: messages.GenerateRequest, headers: Mapping[str, str] | None, *, role: str = "decode") -> NodeStream: ...


class _NatsStream:
    __slots__ = ("node_id", "link_broke", "_request_id", "_key", "_pending", "_waiter", "_due", "_owner", "_timeout", "_closed", "_epoch")

    def __init__(self, owner: "NatsNodeTransport", node_id: str, request_id: str, key: str, timeout: float) -> None:
        self.node_id = node_id
        self.link_broke = False
        self._request_id = request_id
        self._key = key
        self._pending: deque[Msg] = deque()
        self._waiter: asyncio.Future[float | None] | None = None  # set while next() waits
        self._due = 0.0  # when the current wait becomes silence (loop time)
        self._owner = owner
        self._timeout = timeout
        self._closed = False
        self._epoch = owner.link_epoch()

    def _deliver(self, msg: Msg) -> None:
        self._pending.append(msg)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> float | None:
        """Until a message comes (None) or `_timeout` of silence passed (how late the
        sweep noticed it, in seconds)."""
        owner = self._owner
        loop = owner._loop or asyncio.get_running_loop()
        waiter: asyncio.Future[float | None] = loop.create_future()
        self._waiter = waiter
        self._due = loop.time() + self._timeout
        owner._watch(self)
        try:
            return await waiter
        finally:
            self._waiter = None
            owner._waiting.discard(self)

    def buffered(self) -> bool:
        return bool(self._pending)

    async def next(self) -> messages.StreamEvent:
        pending = self._pending
        owner = self._owner
        if not pending:
            late = await self._wait()
            if late is not None and not pending:
                if owner.link_epoch() != self._epoch or not owner.connected():
                    # Our own connection broke: wait for it (bounded), then let the stream
                    # move on without blaming the node.
                    await owner.wait_connected(self._timeout * 4)
                    raise NodeLost(self.node_id, "this router's NATS connection broke meanwhile", ours=True) from None
                if late < _STALL:
                    raise NodeLost(self.node_id, f"silent for {self._timeout:.2f}s") from None
                # Our loop was stalled: what the node sent may be unread in the socket.
                log.info("router loop stalled %.2fs; giving %s one more window", late, self.node_id)
                if await self._wait() is not None and not pending:
                    raise NodeLost(self.node_id, f"silent for {self._timeout:.2f}s (after a {late:.2f}s stall of the router)") from None
        msg = pending.popleft()
        epoch = owner.link_epoch()
        self.link_broke = epoch != self._epoch
        self._epoch = epoch
        if not msg.data:
            headers = msg.headers or {}
            if headers.get("Status") == "503":
                raise NodeLost(self.node_id, "no longer listening (no responders)")
            raise NodeLost(self.node_id, f"empty message, status {headers.get('Status')!r}")
        try:
            return _decode_event(msg.data)
        except msgspec.DecodeError as exc:
            raise NodeLost(self.node_id, f"undecodable stream message: {exc}") from None

    async def cancel(self) -> None:
        """Tell the node to stop working on the request (the client went away, or the
        request moved on). Best effort and never raises: it runs in `finally` blocks, where
        an exception would replace the request's real outcome; a node that misses it drops
        the stream at its deadline, or when this router falls silent."""
        if not self._closed:
            self.close()
            try:
                await self._owner._nc.publish(subjects.node_cancel(self.node_id), _encode(messages.CancelRequest(request_id=self._request_id)))
            except Exception as exc:  # NATS down: nats-py raises several unrelated types
                log.debug("cancel of %s on %s not sent: %s", self._request_id, self.node_id, exc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._streams.pop(self._key, None)


class NatsNodeTransport:
    def __init__(self, nc: NATS, router_id: str, *, liveness_timeout: float = 1.5) -> None:
        self._nc = nc
        self._router_id = router_id
        self._liveness_timeout = liveness_timeout
        self._streams: dict[str, _NatsStream] = {}
        self._prefix_len = len(subjects.router_stream(router_id, ""))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: set[_NatsStream] = set()  # streams whose next() waits for a message
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._entropy = b""  # random bytes for reply subjects (see _secret)
        self._entropy_at = 0

    def _secret(self) -> str:
        """16 hex digits from the OS's CSPRNG, drawn 4 KiB at a time: `secrets.token_hex`
        per request was a getrandom syscall each (issue 16); the bytes are as unguessable."""
        if self._entropy_at >= len(self._entropy):
            self._entropy, self._entropy_at = os.urandom(4096), 0
        at = self._entropy_at
        self._entropy_at = at + 8
        return self._entropy[at : at + 8].hex()

    async def start(self) -> None:
        await self._nc.subscribe(subjects.router_streams(self._router_id), cb=self._on_message)

    def link_epoch(self) -> int:
        """How many times this router's NATS connection was re-made: a change between two
        messages of a stream means messages in between may have been lost on our side."""
        return self._nc.stats["reconnects"]  # type: ignore[no-any-return]

    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def wait_connected(self, limit: float) -> None:
        """Until the connection is back (at most `limit` seconds): a stream that moves on
        while we are cut off would only fail again."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while not self._nc.is_connected and loop.time() < give_up:
            await asyncio.sleep(0.05)

    async def _on_message(self, msg: Msg) -> None:
        stream = self._streams.get(msg.subject[self._prefix_len:])
        if stream is not None:
            stream._deliver(msg)

    def _watch(self, stream: _NatsStream) -> None:
        """`stream` waits: the sweep (armed while anything waits) ends its wait when due."""
        self._waiting.add(stream)
        if self._sweep_timer is None:
            loop = self._loop = self._loop or asyncio.get_running_loop()
            self._sweep_timer = loop.call_later(_TICK, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        waiting = self._waiting
        if not waiting:
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for stream in [s for s in waiting if s._due <= now]:
            waiting.discard(stream)
            waiter = stream._waiter
            if waiter is not None:
                stream._waiter = None
                if not waiter.done():
                    waiter.set_result(now - stream._due)
        if waiting:
            self._sweep_timer = loop.call_later(_TICK, self._sweep)

    async def open(self, node_id: str, request: messages.GenerateRequest, headers: Mapping[str, str] | None, *, role: str = "decode") -> _NatsStream:
        # Each attempt has its own reply subject: a slow first node that wakes up after
        # the retry went elsewhere can never interleave its tokens into the new stream.
        # Its random part makes it unguessable: request ids count up, so a node that saw
        # one could otherwise aim forged tokens at another client's stream.
        key = f"{request.request_id}_{request.attempt}_{self._secret()}"
        stream = _NatsStream(self, node_id, request.request_id, key, self._liveness_timeout)
        self._streams[key] = stream
        try:
            await self._nc.publish(
                subjects.node_generate(node_id) if role == "decode" else subjects.prefill_run(node_id),
                _encode(request),
                reply=subjects.router_stream(self._router_id, key),
                headers=dict(headers) if headers else None,
            )
        except Exception as exc:  # NATS down and the client's buffer full (nats-py raises several types)
            stream.close()
            raise NodeLost(node_id, f"the request could not be sent: NATS is unreachable ({type(exc).__name__})") from None
        return stream
