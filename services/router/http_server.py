"""The router's HTTP/1.1 front door: one ``asyncio.Protocol`` over the httptools C parser.

Why not aiohttp: the router is the fabric's hot path and aiohttp spends ~50 µs of CPU
per request on layers we do not use (middlewares, multidict, a StreamReader per body).
Here a request costs one parser feed, one ``Request`` object, one task and one
``transport.write``; everything that can be computed once is (status lines, the
constant headers, the ``Date`` header, which a per-server ticker refreshes once a second).
``loadtest/http_layer.py`` measures the difference.

Layers::

    serve() -> _Server            an AbstractServer that also knows its live connections
                 └ _ServerState   handler, limits, Date header, the 1 Hz ticker (idle sweep)
                 └ _Connection    one per socket: parse -> queue -> one handler task -> write
                 └ _Refused       one per socket over ``max_connections``: a 503, then close

Semantics worth knowing:

* Keep-alive and pipelining: requests are parsed as bytes arrive and queued; one task
  answers them in order, one at a time.  HTTP/1.0 closes unless it asked for keep-alive.
* A client EOF is a disconnect (as Go's net/http and uvicorn treat it): the handler task
  is cancelled, which closes a streaming generator, so the router cancels upstream work.
* Errors before a handler runs (400, 413, 431) answer in the OpenAI error shape and close
  the connection, after answering every request queued before the bad one.
* Bounded: at most ``max_connections`` sockets per server, counted from accept to close
  in whatever state (reading, answering, idle, lingering after an error). One more is
  answered ``503`` with ``Retry-After: 1`` before anything of it is read, and closed, so a
  flood of clients costs a write each instead of memory and a handler each. The same
  holds per client address with ``max_connections_per_client`` (checked once the peer is
  known, in ``connection_made``), so one address cannot take every slot.
* Header deadline: a request head (request line and headers) must be complete within
  ``header_timeout`` seconds of its first byte, and the first one of a connection within
  ``header_timeout`` of connecting; else ``408`` and close (a client trickling a byte a
  second would otherwise hold its connection forever, each byte resetting the idle clock).
  The waiting heads sit in one dict in deadline order and one timer, armed for the
  earliest, answers each when its deadline passes (no timer per request, no scan).
  A keep-alive connection waiting for its next request is idle, not late: ``IDLE_TIMEOUT``
  governs it, as in nginx and Go's net/http, checked by the sweep (every ``_SWEEP_EVERY``
  ticks).
* Body deadline (Apache's ``mod_reqtimeout`` rule): a body must be complete within
  ``body_timeout`` seconds of its head, plus one second per ``min_body_rate`` bytes
  received; else ``408`` and close. Checked every tick, over the few requests whose body
  is still arriving.
* ``authorize(method, path, headers)`` runs when the head is complete, before any of the
  body is read: a ``Response`` it returns (a 401) is sent at once and the body is
  discarded unread; anything else rides on ``Request.auth`` to the handler.
* ``HEAD`` is ``GET`` without the body (RFC 9110 9.3.2): the handler sees a ``GET`` and
  the response goes out with its status and headers (``content-length`` included) only.
* ``X-Request-Id``: a caller's id (at most 128 characters of ``[A-Za-z0-9._~:/+=@-]``)
  comes back as the response's ``x-request-id``, in place of the handler's own (the
  router's id stays in the body's ``id``). It is not adopted as the request's id: that
  one names the request's NATS stream and must be unique, which a caller's id (reused
  by its retries, or by a proxy's bug) is not. An id that fails the check is not echoed.
* Trace context: a ``traceparent`` (and ``tracestate``) becomes the request task's
  current OpenTelemetry context, so the request's span continues the caller's trace;
  with an exporter the task also notes ``server.address``/``server.port`` (from ``Host``)
  and the caller's request id for that span (``tracing.note_front_door``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import socket
import ssl as _ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
import msgspec
from tierflow.runtime.tracing import continue_trace, exporting, note_front_door

__all__ = ["Authorize", "Handler", "Request", "Response", "StreamingResponse", "serve", "shutdown"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT: float = 75.0
"""Seconds a keep-alive connection may sit idle (or a slow reader stall a response)."""

MAX_CONNECTIONS = 10_000
"""Default ``serve(max_connections=...)``: well under a default ``ulimit -n`` of 65,536."""
HEADER_TIMEOUT = 30.0
"""Default ``serve(header_timeout=...)``, in seconds (nginx's ``client_header_timeout`` is 60)."""
MAX_CONNECTIONS_PER_CLIENT = 1_000
"""Default ``serve(max_connections_per_client=...)``: a tenth of the process's connections."""
BODY_TIMEOUT = 30.0
"""Default ``serve(body_timeout=...)``: seconds a body may take, before ``min_body_rate`` credit."""
MIN_BODY_RATE = 16 << 10
"""Default ``serve(min_body_rate=...)``: bytes a second that extend the body deadline by one second."""

_TICK = 1.0  # ticker period: Date refresh; the idle sweep runs every _SWEEP_EVERY ticks
_SWEEP_EVERY = 5
_LINGER = 2.0  # after an error response, drain the client's unread body this long
_MAX_PIPELINE = 32  # queued requests per connection before we stop reading the socket
_MAX_HEADER_BYTES = 64 << 10  # request line + headers; llhttp itself has no limit
_MAX_REFUSED_LINGERING = 256  # refused sockets kept open to deliver their 503; beyond: closed at once

# ---------------------------------------------------------------- built once, at import
_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in HTTPStatus
}
_NO_BODY_STATUSES = frozenset({204, 304} | set(range(100, 200)))
_CONNECTION_CLOSE = b"connection: close\r\n"
_CONNECTION_KEEP_ALIVE = b"connection: keep-alive\r\n"  # only HTTP/1.0 needs to be told
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_METHODS: dict[bytes, str] = {
    m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
}
_COMMON_HEADERS = (
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "authorization",
    "connection", "content-length", "content-type", "expect", "transfer-encoding",
    "x-request-id", "traceparent", "tracestate", "openai-organization", "openai-project",
)
_HEADER_NAMES: dict[bytes, str] = {
    spelling.encode(): name
    for name in _COMMON_HEADERS
    for spelling in (name, name.title(), name.upper())
}
_ERRORS = msgspec.json.Encoder()
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~:/+=@-")
MAX_REQUEST_ID = 128
"""The longest caller ``X-Request-Id`` echoed (a UUID is 36, a W3C trace id 32)."""


def client_request_id(headers: dict[str, str]) -> str | None:
    """The caller's ``X-Request-Id`` when it is one we echo (see the module docstring)."""
    value = headers.get("x-request-id")
    if value is None or not 0 < len(value) <= MAX_REQUEST_ID or not _REQUEST_ID_CHARS.issuperset(value):
        return None
    return value


def _server_address(host: str | None, sockname: object) -> tuple[str, int]:
    """``server.address``/``server.port`` of a request: its ``Host`` header (what the
    caller asked for), else the socket it arrived on."""
    if host:
        name, sep, port = host.rpartition(":")
        if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
            return name.strip("[]"), int(port)
        return host.strip("[]"), 80
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    return "", 0


def _error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> bytes:
    """An OpenAI-shaped error document, so SDK clients surface our message verbatim."""
    return _ERRORS.encode(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    )


def _refusal_tail(max_connections: int, per_client: bool = False) -> bytes:
    """The 503 for a connection over the limit, after its status and ``Date`` lines."""
    body = _error_body(
        f"your address has {max_connections} connections open, the most one client may hold; "
        "retry after 1 s, or reuse a keep-alive connection" if per_client else
        f"the server is at its limit of {max_connections} open connections; "
        "retry after 1 s, or reuse a keep-alive connection", "server_error", "too_many_connections")
    return (
        b"content-type: application/json\r\nretry-after: 1\r\ncontent-length: %d\r\n%b\r\n%b"
        % (len(body), _CONNECTION_CLOSE, body)
    )


def _header_line(name: str, value: str) -> bytes:
    """One ``name: value`` line; CR/LF are refused so a handler cannot split the response."""
    line = f"{name}: {value}"
    if "\r" in line or "\n" in line:
        raise ValueError(f"CR/LF in response header {name!r}")
    return line.encode("latin-1") + b"\r\n"


def _http_date() -> bytes:
    """The ``Date`` header line; the one wall-clock read here, made once a second."""
    return b"date: " + formatdate(time.time(), usegmt=True).encode("ascii") + b"\r\n"


# ------------------------------------------------------------------------------ the API
class Request:
    """One parsed request, built once by the protocol; handlers only read it."""

    __slots__ = ("method", "path", "query", "headers", "body", "peer", "auth")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, peer: str,
        auth: object = None,
    ) -> None:
        self.method = method
        self.path = path  # percent-decoded, without the query string
        self.query = query  # raw, "" if none
        self.headers = headers  # lower-cased names; the last repeat wins
        self.body = body
        self.peer = peer  # "ip:port" ("[ip6]:port")
        self.auth = auth  # what ``serve(authorize=...)`` returned for this head (None without one)

    def __repr__(self) -> str:
        return f"Request({self.method} {self.path!r} from {self.peer}, {len(self.body)} B)"


class Response(msgspec.Struct, gc=False):
    """A complete response, sent with ``Content-Length`` in one write.

    ``gc=False``: it holds only bytes/str/ints, so the collector need not track it.
    """

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class StreamingResponse(msgspec.Struct):
    """A response whose body is written chunk by chunk (``Transfer-Encoding: chunked``)
    as the iterator yields, which is what Server-Sent Events need."""

    status: int
    chunks: AsyncIterator[bytes]
    content_type: str = "text/event-stream"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]
Authorize = Callable[[str, str, dict[str, str]], object]
"""``(method, path, headers)`` when a head is complete: a ``Response`` refuses the request
before its body is read; any other value becomes ``Request.auth``."""

_INTERNAL_ERROR = Response(500, _error_body("internal server error", "server_error", "internal_error"))


# ----------------------------------------------------------------------------- serving
class _ServerState:
    """Everything one ``serve()`` call shares among its connections."""

    def __init__(
        self,
        handler: Handler,
        max_body: int,
        loop: asyncio.AbstractEventLoop,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
        body_timeout: float = BODY_TIMEOUT,
        min_body_rate: float = MIN_BODY_RATE,
        authorize: Authorize | None = None,
    ) -> None:
        for name, value in (("max_connections", max_connections), ("max_connections_per_client", max_connections_per_client)):
            if value < 0:
                raise ValueError(f"{name} must be 0 (no limit) or more, got {value}")
        for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout), ("min_body_rate", min_body_rate)):
            if not value >= 0:
                raise ValueError(f"{name} must be 0 (none) or more, got {value}")
        self.handler = handler
        self.authorize = authorize
        self.max_body = max_body
        self.loop = loop
        self.max_connections = max_connections
        self.max_per_client = max_connections_per_client
        self.header_timeout = header_timeout or math.inf
        self.body_timeout = body_timeout or math.inf
        self.min_body_rate = min_body_rate or math.inf  # 0: no credit for bytes received
        self.header_timeout_response = Response(408, _error_body(
            f"the request head (request line and headers) did not arrive within "
            f"{header_timeout:g} s; send it at once", "timeout_error"))
        self.body_timeout_response = Response(408, _error_body(
            f"the request body did not arrive within {body_timeout:g} s of its head plus 1 s per "
            f"{min_body_rate:g} bytes; send it faster", "timeout_error"))
        self.refusal_tail = _refusal_tail(max_connections)
        self.client_refusal_tail = _refusal_tail(max_connections_per_client, per_client=True)
        self.context = contextvars.copy_context()  # each request task runs in a copy
        self.connections: set[_Connection] = set()
        self.clients: dict[str, int] = {}  # client address -> its open connections
        # Connections whose request head is due, in deadline order (one header_timeout
        # each, so insertion order is deadline order), and the one timer for the first.
        self.heads: dict[_Connection, float] = {}
        self.head_timer: asyncio.TimerHandle | None = None
        self.bodies: dict[_Connection, float] = {}  # body arriving: when its head completed
        self.refusing: set[_Refused] = set()  # over the limit: answered 503, closing
        self.refused = 0  # connections refused since the server started
        self.refused_per_client = 0  # of which over max_connections_per_client
        self.late_heads = 0  # connections answered 408 since the server started
        self.late_bodies = 0  # connections answered 408 for a slow body since the server started
        self._logged = (0, 0, 0)  # (refused, late_heads, late_bodies) as of the last warning
        self.orphans: set[asyncio.Task[None]] = set()  # cancelled tasks still unwinding
        self.date = _http_date()
        self.content_types: dict[str, bytes] = {}
        self.ticks = 0
        self.draining = False
        self.all_closed: asyncio.Future[None] | None = None
        self.is_serving: Callable[[], bool] = lambda: True
        self.timer: asyncio.TimerHandle | None = loop.call_later(_TICK, self.tick)

    def accept(self) -> asyncio.Protocol:
        """The protocol factory: a ``_Connection`` while under ``max_connections``, else a
        ``_Refused``. Counted here, at accept, not in ``connection_made``: asyncio calls
        every factory of an accept burst before the first ``connection_made``."""
        if self.max_connections and len(self.connections) >= self.max_connections:
            self.refused += 1
            return _Refused(self)
        conn = _Connection(self)
        self.connections.add(conn)
        return conn

    def await_head(self, conn: _Connection) -> None:
        """``conn`` waits for a request head from now on: its deadline is now + header_timeout."""
        heads = self.heads
        heads.pop(conn, None)
        now = self.loop.time()
        heads[conn] = now
        if self.head_timer is None and self.header_timeout != math.inf:
            self.head_timer = self.loop.call_at(now + self.header_timeout, self._heads_due)

    def _heads_due(self) -> None:
        """The timer: answer 408 to every head past its deadline, re-arm for the next one."""
        self.head_timer = None
        heads, timeout = self.heads, self.header_timeout
        now = self.loop.time() + 0.002  # uvloop's clock and timers are in whole milliseconds
        late = []
        while heads:
            conn, since = next(iter(heads.items()))
            if now - since < timeout:
                break
            del heads[conn]
            late.append(conn)
        for conn in late:
            conn.head_late()  # may re-enter await_head (and arm the timer)
        if heads and self.head_timer is None:
            since = next(iter(heads.values()))
            self.head_timer = self.loop.call_at(since + timeout, self._heads_due)

    def forget(self, conn: _Connection) -> None:
        self.heads.pop(conn, None)
        self.bodies.pop(conn, None)
        client = conn.client
        if client is not None:
            conn.client = None
            left = self.clients[client] - 1
            if left:
                self.clients[client] = left
            else:
                del self.clients[client]
        self.connections.discard(conn)
        if not self.connections and self.all_closed is not None and not self.all_closed.done():
            self.all_closed.set_result(None)

    def _check_bodies(self) -> None:
        """408 to bodies later than ``body_timeout`` plus their bytes' credit."""
        now = self.loop.time()
        timeout, rate = self.body_timeout, self.min_body_rate
        for conn, since in list(self.bodies.items()):
            if now - since > timeout + conn.body_bytes / rate:
                conn.body_late()

    def tick(self) -> None:
        """Refresh ``Date``, answer late bodies and, every few seconds, close idle or
        stalled connections."""
        self.date = _http_date()
        self.ticks += 1
        if self.bodies:
            self._check_bodies()
        if self.ticks % _SWEEP_EVERY == 0:
            for conn in list(self.connections):
                conn.sweep(self.ticks)
            if (self.refused, self.late_heads, self.late_bodies) != self._logged:
                self._warn()
        if self.is_serving() or self.connections:
            self.timer = self.loop.call_later(_TICK, self.tick)
        else:
            self.timer = None

    def _warn(self) -> None:
        """One line per sweep for what a flood would otherwise log once per connection."""
        refused, late = self.refused - self._logged[0], self.late_heads - self._logged[1]
        late_bodies = self.late_bodies - self._logged[2]
        log.warning(
            "in the last %ds: refused %d connections over the limit of %d (or %d per client); "
            "answered 408 to %d whose request head came slower than %g s and %d whose body came too slowly",
            round(_SWEEP_EVERY * _TICK), refused, self.max_connections, self.max_per_client, late,
            self.header_timeout, late_bodies,
            extra={"fields": {"refused_connections": refused, "max_connections": self.max_connections,
                              "max_connections_per_client": self.max_per_client, "late_heads": late,
                              "late_bodies": late_bodies, "open_connections": len(self.connections),
                              "client_addresses": len(self.clients)}},
        )
        self._logged = (self.refused, self.late_heads, self.late_bodies)

    def content_type_header(self, content_type: str) -> bytes:
        """``content-type`` lines are few and repeat, so each is encoded once per server."""
        line = self.content_types.get(content_type)
        if line is None:
            line = _header_line("content-type", content_type)
            if len(self.content_types) < 64:
                self.content_types[content_type] = line
        return line



class _Server(asyncio.AbstractServer):
    """The listening server plus the connection registry ``shutdown()`` needs (asyncio's
    and uvloop's ``wait_closed`` do not wait for connections on Python 3.11)."""

    def __init__(self, inner: asyncio.AbstractServer, state: _ServerState) -> None:
        self._inner = inner
        self.state = state
        state.is_serving = inner.is_serving

    @property
    def open_connections(self) -> int:
        """Connections counted against ``max_connections`` now (for a gauge)."""
        return len(self.state.connections)

    @property
    def refused_connections(self) -> int:
        """Connections refused over ``max_connections`` since start (for a counter)."""
        return self.state.refused

    @property
    def late_request_heads(self) -> int:
        """Connections answered 408 for a late request head since start (for a counter)."""
        return self.state.late_heads

    @property
    def refused_per_client(self) -> int:
        """Of ``refused_connections``, those over ``max_connections_per_client``."""
        return self.state.refused_per_client

    @property
    def late_request_bodies(self) -> int:
        """Connections answered 408 for a body slower than its deadline since start."""
        return self.state.late_bodies

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._inner.sockets)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop accepting; open connections live on until idle (see ``shutdown``)."""
        self._inner.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._inner.get_loop()

    def is_serving(self) -> bool:
        return self._inner.is_serving()

    async def start_serving(self) -> None:
        await self._inner.start_serving()

    async def serve_forever(self) -> None:
        await self._inner.serve_forever()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body_bytes: int = 8 << 20,
    backlog: int = 2048,
    reuse_port: bool = False,
    max_connections: int = MAX_CONNECTIONS,
    header_timeout: float = HEADER_TIMEOUT,
    ssl: _ssl.SSLContext | None = None,
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    body_timeout: float = BODY_TIMEOUT,
    min_body_rate: float = MIN_BODY_RATE,
    authorize: Authorize | None = None,
) -> asyncio.AbstractServer:
    """Listen on ``host:port`` and answer every request with ``handler``; returns once
    listening (port 0 picks a free port: read it from ``server.sockets``).

    ``max_connections`` bounds the open connections of this server and
    ``max_connections_per_client`` those of one client address (0: no bound);
    ``header_timeout`` the seconds a request head may take to arrive, ``body_timeout``
    and ``min_body_rate`` a body (0: forever); ``authorize`` checks a head before its
    body is read. See the module docstring. With ``ssl`` (``tierflow.runtime.tls.server_ssl_context``) the
    port speaks HTTPS only: a plaintext request fails the handshake and is closed without
    an answer; the handshake itself must finish within ``header_timeout`` (the connection
    is handed to us, and its deadlines start, only once it has)."""
    loop = asyncio.get_running_loop()
    state = _ServerState(
        handler, max_body_bytes, loop, max_connections=max_connections, header_timeout=header_timeout,
        max_connections_per_client=max_connections_per_client, body_timeout=body_timeout,
        min_body_rate=min_body_rate, authorize=authorize,
    )
    try:
        inner = await loop.create_server(
            state.accept, host, port, backlog=backlog, reuse_port=reuse_port,
            ssl=ssl, ssl_handshake_timeout=(header_timeout or None) if ssl is not None else None,
        )
    except BaseException:
        if state.timer is not None:
            state.timer.cancel()
        raise
    return _Server(inner, state)


async def shutdown(server: asyncio.AbstractServer, grace: float) -> None:
    """Stop accepting, let in-flight requests finish for up to ``grace`` seconds (idle
    connections close at once, busy ones after their last queued response), then abort
    what is left and wait for its handler tasks to unwind."""
    server.close()
    if not isinstance(server, _Server):
        await server.wait_closed()
        return
    state = server.state
    state.draining = True
    for conn in list(state.connections):
        conn.drain()
    await _wait_for_connections(state, grace)
    for conn in list(state.connections):
        conn.abort()
    for refused in list(state.refusing):
        refused.abort()
    if state.orphans:  # bounded: a handler may swallow its cancellation
        await asyncio.wait(set(state.orphans), timeout=1.0)
    await _wait_for_connections(state, 1.0)  # connection_lost() follows abort() next tick
    if state.timer is not None:
        state.timer.cancel()
        state.timer = None
    if state.head_timer is not None:
        state.head_timer.cancel()
        state.head_timer = None
    await server.wait_closed()


async def _wait_for_connections(state: _ServerState, timeout: float) -> None:
    if not state.connections:
        return
    if state.all_closed is None or state.all_closed.done():
        state.all_closed = state.loop.create_future()
    try:
        await asyncio.wait_for(asyncio.shield(state.all_closed), timeout)
    except TimeoutError:
        pass


# -------------------------------------------------------------------------- protocol
_QueueItem = tuple[Request | Response, bool, bool]  # (request or error, keep_alive, http10)


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with a 4xx answer (``response``:
    one made already, such as ``authorize``'s 401)."""

    def __init__(self, status: int, message: str, response: Response | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.response = response


class _Resume:
    """Finish awaiting an awaitable whose first step ``_stream`` took by hand (to learn
    whether it would wait); this is PEP 380's expansion of ``yield from``, so the task
    sees the same futures, cancellations and results as with a plain ``await``."""

    __slots__ = ("_step", "_suspended_on")

    def __init__(self, step: Generator[Any, Any, Any], suspended_on: Any) -> None:
        self._step = step
        self._suspended_on = suspended_on

    def __await__(self) -> Generator[Any, Any, Any]:
        step, value = self._step, self._suspended_on
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                step.close()
                raise
            except BaseException as exc:  # CancelledError above all: pass it in
                try:
                    value = step.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = step.send(sent)
                except StopIteration as done:
                    return done.value


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections``: answered 503 at once, never parsed, closed.

    The client has usually sent its request already, and closing a socket with unread
    input sends RST, which can destroy the 503 in flight; so, like an error response,
    the socket half-closes and discards input until the client closes or ``_LINGER``
    passes, unless too many refused sockets are lingering already (a flood)."""

    __slots__ = ("_state", "_transport", "_timer", "_tail")

    def __init__(self, state: _ServerState, tail: bytes | None = None) -> None:
        self._state = state
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = tail if tail is not None else state.refusal_tail

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's is no asyncio.Transport subclass.
        stream: asyncio.Transport = transport  # type: ignore[assignment]
        self._transport = stream
        state = self._state
        stream.write(_STATUS_LINES[503] + state.date + self._tail)
        if len(state.refusing) < _MAX_REFUSED_LINGERING and stream.can_write_eof():
            state.refusing.add(self)
            stream.write_eof()
            self._timer = state.loop.call_later(_LINGER, stream.close)
        else:
            stream.close()

    def data_received(self, data: bytes) -> None:
        pass  # never parsed

    def eof_received(self) -> bool:
        return False  # the client is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.refusing.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _Connection(asyncio.Protocol):
    """One client connection: httptools calls the ``on_*`` methods while ``data_received``
    feeds it; complete requests queue up and ``_run`` answers them one at a time."""

    __slots__ = (
        "_state", "_loop", "_transport", "_parser", "_peer", "_url", "_headers", "_body",
        "_body_size", "_header_bytes", "_in_message", "_keep_alive", "_http10", "_queue",
        "_task", "_busy", "_done_reading", "_reading_paused", "_closing", "_write_paused",
        "_drain_waiter", "_paused_tick", "_last_tick", "_continue_pending", "_linger",
        "_awaiting_head", "client", "_path", "_query", "_auth",
    )

    def __init__(self, state: _ServerState) -> None:
        self._state = state
        self._loop = state.loop
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made sets it
        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._header_bytes = 0
        self._in_message = False
        self._keep_alive = True
        self._http10 = False
        self._queue: deque[_QueueItem] = deque()
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._done_reading = False  # no more requests will be parsed on this connection
        self._reading_paused = False
        self._closing = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused_tick = 0
        self._last_tick = state.ticks
        self._continue_pending = False
        self._linger: asyncio.TimerHandle | None = None
        self.client: str | None = None  # the address counted in state.clients, once known
        self._path = ""
        self._query = ""
        self._auth: object = None
        # The header deadline: the first head counts from the accept, later ones from
        # their first byte (on_message_begin); on_headers_complete ends the wait.
        self._awaiting_head = True
        state.await_head(self)

    @property
    def body_bytes(self) -> int:
        """Bytes of the current request's body received so far (the body deadline's credit)."""
        return self._body_size

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # always a stream transport
        if self._closing:  # aborted by shutdown between accept and now
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # a streamed first token must not wait on Nagle + delayed ACK
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (a Unix socket in some test setup)
                pass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = peer[0]
            self._peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
            state = self._state
            if state.max_per_client:
                held = state.clients.get(host, 0)
                if held >= state.max_per_client:
                    self._refuse(transport)
                    return
                state.clients[host] = held + 1
                self.client = host

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        """Over ``max_connections_per_client``: hand the socket to a ``_Refused`` (a 503,
        then close), and stop counting it as a connection."""
        state = self._state
        state.refused += 1
        state.refused_per_client += 1
        self._closing = self._done_reading = True
        state.forget(self)
        refused = _Refused(state, state.client_refusal_tail)
        transport.set_protocol(refused)
        refused.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._state.forget(self)
        if self._linger is not None:
            self._linger.cancel()
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the handler (or its stream) sees CancelledError and cleans up
            self._state.orphans.add(task)
            task.add_done_callback(self._state.orphans.discard)
        self._task = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._paused_tick = self._state.ticks

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._done_reading:
            return  # after Connection: close, an error, or while lingering: discard
        self._last_tick = self._state.ticks
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We do not switch protocols: answer the request, then close.
            self._done_reading = True
            if self._queue:
                request, _, http10 = self._queue.pop()
                self._queue.append((request, False, http10))
        except httptools.HttpParserError as exc:
            if not self._done_reading:  # llhttp also objects to bytes after "close"
                reject = exc.__context__
                if isinstance(reject, _Reject) and reject.response is not None:
                    answer = reject.response
                elif isinstance(reject, _Reject):
                    answer = Response(reject.status, _error_body(str(reject)))
                else:
                    answer = Response(400, _error_body(f"malformed HTTP request: {exc}"))
                self._queue.append((answer, False, False))
                self._done_reading = True
                self._state.heads.pop(self, None)
                self._state.bodies.pop(self, None)
        if self._queue and not self._busy:
            self._dispatch()
        elif self._done_reading and not self._busy:
            self._close()  # e.g. an upgrade request that never completed

    # -- parser callbacks
    def on_message_begin(self) -> None:
        if not self._awaiting_head:  # a later request: its deadline starts now
            self._awaiting_head = True
            self._state.await_head(self)
        self._in_message = True
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            raise _Reject(431, "request headers too large")
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
        self._headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        state = self._state
        state.heads.pop(self, None)
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()
        self._http10 = parser.get_http_version() == "1.0"
        headers = self._headers
        length = headers.get("content-length")
        if length is not None and int(length) > state.max_body:
            raise _Reject(413, f"request body exceeds {state.max_body} bytes")
        url = self._url
        if url.startswith(b"/"):
            raw_path, _, raw_query = url.partition(b"?")
        elif url == b"*":
            raw_path, raw_query = url, b""
        else:  # absolute-form, as sent to proxies
            parsed = httptools.parse_url(url)
            raw_path, raw_query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        self._path, self._query = path, raw_query.decode("latin-1")
        self._auth = None
        if state.authorize is not None:
            method = parser.get_method()
            try:
                verdict = state.authorize(_METHODS.get(method) or method.decode("ascii"), path, headers)
            except Exception:  # our bug, not the client's: a 500, never a "malformed request"
                log.exception("authorize failed on %s", path)
                verdict = _INTERNAL_ERROR
            if isinstance(verdict, Response):
                raise _Reject(verdict.status, "refused before the body", verdict)
            self._auth = verdict
        if (length is not None and length != "0") or "transfer-encoding" in headers:
            state.bodies[self] = state.loop.time()  # the body's deadline runs from here
        expect = headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and not self._http10:
            if self._busy or self._queue:
                self._continue_pending = True  # sent once earlier responses are out
            else:
                self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._state.max_body:
            raise _Reject(413, f"request body exceeds {self._state.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        bodies = self._state.bodies
        if bodies:
            bodies.pop(self, None)
        parts = self._body
        body = b"" if not parts else parts[0] if len(parts) == 1 else b"".join(parts)
        method = self._parser.get_method()
        request = Request(
            _METHODS.get(method) or method.decode("ascii"),
            self._path,
            self._query,
            self._headers,
            body,
            self._peer,
            self._auth,
        )
        self._queue.append((request, self._keep_alive, self._http10))
        self._in_message = False
        self._continue_pending = False  # the body is here; no need to invite it
        if not self._keep_alive:
            self._done_reading = True
        if len(self._queue) >= _MAX_PIPELINE and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True

    # -- answering
    def _dispatch(self) -> None:
        self._busy = True
        self._task = self._loop.create_task(self._run(), context=self._state.context.copy())

    async def _run(self) -> None:
        """Answer the head of the queue; then hand over to a fresh task for the next one,
        so that context variables a handler sets do not leak into the next request."""
        item, keep_alive, http10 = self._queue.popleft()
        if self._reading_paused and len(self._queue) < _MAX_PIPELINE // 2:
            self._reading_paused = False
            self._transport.resume_reading()
        if type(item) is Response:  # a 4xx decided by the parser
            self._write(item, False, False)
            self._close(linger=True)
            return
        assert isinstance(item, Request)
        keep = keep_alive
        headers = item.headers
        echo = client_request_id(headers) if "x-request-id" in headers else None
        continue_trace(headers)  # this task is the request's: the caller's trace context becomes current
        if exporting():
            address, port = _server_address(headers.get("host"), self._transport.get_extra_info("sockname"))
            note_front_door(address, port, echo or "")
        head_only = item.method == "HEAD"
        if head_only:
            item = Request("GET", item.path, item.query, headers, item.body, item.peer, item.auth)
        try:
            response = await self._state.handler(item)
            # Decided now, not before the handler: shutdown may have begun meanwhile.
            if (self._done_reading or self._state.draining) and not self._queue:
                keep = False
            if isinstance(response, StreamingResponse):
                keep = await self._stream(response, keep, http10, echo, head_only)
            else:
                self._write(response, keep, http10, echo, head_only)
        except Exception:
            log.exception("handler failed on %s %s", item.method, item.path)
            self._write(_INTERNAL_ERROR, keep, http10, echo, head_only)
        if self._write_paused and not self._closing:
            await self._drain()
        self._busy = False
        self._task = None
        self._last_tick = self._state.ticks  # idle time counts from the last answer
        if self._closing:
            return
        if not keep:
            self._close()
        elif self._queue:
            self._dispatch()
        elif self._continue_pending:
            self._continue_pending = False
            self._transport.write(_CONTINUE)
        elif (self._done_reading or self._state.draining) and not self._in_message:
            self._close()

    def _head(
        self, status: int, content_type: str, extra: tuple[tuple[str, str], ...], echo: str | None = None
    ) -> list[bytes]:
        """Status line, Date and content-type (all cached), then the handler's headers
        (and the caller's ``x-request-id`` in place of the handler's, when ``echo``)."""
        line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        head = [line, self._state.date, self._state.content_type_header(content_type)]
        if echo is None:
            for name, value in extra:
                head.append(_header_line(name, value))
        else:
            for name, value in extra:
                if name.lower() != "x-request-id":
                    head.append(_header_line(name, value))
            head.append(_header_line("x-request-id", echo))
        return head

    def _write(self, response: Response, keep: bool, http10: bool, echo: str | None = None, head_only: bool = False) -> None:
        """Render and send a complete response in one write (raises before writing
        anything, so a bad header still becomes a clean 500). ``head_only``: a HEAD's
        answer, whose ``content-length`` is the body's but the body stays home."""
        if not isinstance(response, Response):
            raise TypeError(f"handler returned {type(response).__name__}, not a Response")
        head = self._head(response.status, response.content_type, response.headers, echo)
        body = response.body
        if response.status in _NO_BODY_STATUSES:
            body = b""
        else:
            head.append(b"content-length: %d\r\n" % len(body))
            if head_only:
                body = b""
        if not keep:
            head.append(_CONNECTION_CLOSE)
        elif http10:
            head.append(_CONNECTION_KEEP_ALIVE)
        head.append(b"\r\n")
        if len(body) < 65536:
            head.append(body)
            self._transport.write(b"".join(head))
        else:  # do not copy a large body just to save one write
            self._transport.writelines((b"".join(head), body))

    async def _stream(self, response: StreamingResponse, keep: bool, http10: bool, echo: str | None = None, head_only: bool = False) -> bool:
        """Send the chunks as the iterator yields them, waiting while the client's socket
        is full; returns whether the connection may be reused.

        Chunks are written the moment the iterator is about to wait (or 64 KiB pile up),
        so no chunk ever waits on a later event, which is what SSE needs; chunks yielded
        without waiting in between share one write (hyper flushes the same way, when the
        body stream returns Pending) instead of costing a syscall each.  The head waits
        with them, so an iterator that fails at once still gets a clean 500.
        """
        chunks = response.chunks
        transport = self._transport
        try:
            head = self._head(response.status, response.content_type, response.headers, echo)
            if head_only:  # the head a GET would get, and no body: the iterator is closed unread
                if not http10:
                    head.append(_CHUNKED)
                if not keep:
                    head.append(_CONNECTION_CLOSE)
                head.append(b"\r\n")
                transport.write(b"".join(head))
                return keep
            if http10:  # no chunked coding in HTTP/1.0: the body ends at close
                keep = False
            else:
                head.append(_CHUNKED)
            if not keep:
                head.append(_CONNECTION_CLOSE)
            head.append(b"\r\n")
            out = [b"".join(head)]
            pending = 0
            sent = False
            next_chunk = chunks.__anext__
            try:
                while True:
                    if self._write_paused:
                        await self._drain()
                    step = next_chunk().__await__()
                    try:
                        suspended_on = step.send(None)
                    except StopIteration as ready:  # yielded without waiting
                        chunk = ready.value
                    except StopAsyncIteration:
                        break
                    else:  # about to wait: flush what we have, then wait with it
                        if out:
                            transport.write(b"".join(out))
                            out, pending, sent = [], 0, True
                        try:
                            chunk = await _Resume(step, suspended_on)
                        except StopAsyncIteration:
                            break
                    if not chunk:
                        continue  # an empty chunk would end the body
                    out.append(chunk if http10 else b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    pending += len(chunk)
                    if pending >= 65536:
                        transport.write(b"".join(out))
                        out, pending, sent = [], 0, True
            except Exception:
                log.exception("stream failed on status %d", response.status)
                if not sent:
                    self._write(_INTERNAL_ERROR, keep, http10)
                    return keep
                # Headers are out: the only honest signal left is an unterminated body.
                if out:
                    transport.write(b"".join(out))
                self._close()
                return False
            if not http10:
                out.append(_LAST_CHUNK)
            transport.write(b"".join(out))
            return keep
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()  # runs the generator's finally, even when we were cancelled

    async def _drain(self) -> None:
        waiter = self._drain_waiter = self._loop.create_future()
        await waiter  # resume_writing() sets it; connection_lost() cancels our task

    # -- closing
    def _close(self, linger: bool = False) -> None:
        """Close after flushing.  With ``linger``, half-close and discard input for a
        moment first: closing with an unread request body in the kernel sends RST, which
        can destroy the error response before the client reads it."""
        if self._closing:
            return
        self._closing = True
        self._done_reading = True
        transport = self._transport
        if self._reading_paused:
            transport.resume_reading()
        if linger and transport.can_write_eof():
            transport.write_eof()
            self._linger = self._loop.call_later(_LINGER, transport.close)
        else:
            transport.close()

    def drain(self) -> None:
        """Shutdown began: idle connections close now, busy ones after their last answer."""
        if self._transport is None:
            return  # not connected yet: it closes after its first answer, or at the abort
        if not self._busy and not self._queue and not self._in_message:
            self._close()

    def abort(self) -> None:
        """The grace period is over: cancel the handler and drop the socket."""
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self._state.orphans.add(self._task)
            self._task.add_done_callback(self._state.orphans.discard)
        self._task = None
        if self._transport is None:  # accepted, not yet connected: connection_made aborts it
            self._state.forget(self)
        else:
            self._transport.abort()

    def head_late(self) -> None:
        """The request head missed its deadline: 408 (after what is queued), then close."""
        if self._closing or self._done_reading or not self._awaiting_head:
            return
        if self._reading_paused:  # our backlog, not the client's pace: a fresh deadline
            self._state.await_head(self)
            return
        self._state.late_heads += 1
        self._late(self._state.header_timeout_response)

    def body_late(self) -> None:
        """The body is slower than its deadline (see ``_ServerState._check_bodies``)."""
        state = self._state
        if self._reading_paused or self._continue_pending:  # waiting on us, not on the client
            state.bodies[self] = state.loop.time()
            return
        state.bodies.pop(self, None)
        if self._closing or self._done_reading:
            return
        state.late_bodies += 1
        self._late(state.body_timeout_response)

    def _late(self, response: Response) -> None:
        self._done_reading = True  # nothing more is parsed; answered after what is queued
        self._queue.append((response, False, False))
        if self._transport is None:  # accepted, never connected: nothing to answer
            self._closing = True  # connection_made, if it ever comes, aborts
            self._state.forget(self)
        elif not self._busy:
            self._dispatch()

    def sweep(self, ticks: int) -> None:
        """Close a connection idle for IDLE_TIMEOUT, or one whose reader stalled a
        response that long (else a client that stops reading pins a handler forever)."""
        if self._transport is None:
            if ticks - self._last_tick >= 2:  # the loop dropped it between accept and connect
                self._state.forget(self)
            return
        if self._busy:
            if self._write_paused and ticks - self._paused_tick >= IDLE_TIMEOUT:
                log.info("aborting %s: client stopped reading", self._peer)
                self.abort()
        elif ticks - self._last_tick >= IDLE_TIMEOUT and not self._queue:
            self._close()
