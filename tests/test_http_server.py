"""The router's HTTP/1.1 front door, over real sockets on 127.0.0.1.

Most tests speak raw HTTP through ``asyncio.open_connection`` so they can see framing
(keep-alive, pipelining, chunks as they arrive); a few use aiohttp as an ordinary client.
Every server is shut down after its test and no handler task may outlive it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import uvloop

from tierflow.services.router import http_server
from tierflow.services.router.http_server import (
    Request,
    Response,
    StreamingResponse,
    serve,
    shutdown,
)

HOST = "127.0.0.1"
WAIT = 5.0  # seconds any single read may take before the test fails instead of hanging

Start = Callable[..., Awaitable[int]]


def _server_tasks() -> set[asyncio.Task[object]]:
    return {
        t for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "_Connection._run" and not t.done()
    }


@pytest.fixture
def start(start_http: Start) -> Start:
    return start_http


async def echo(request: Request) -> Response:
    """Answers with what it was asked, so tests can check parsing end to end."""
    body = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": request.headers,
        "body": request.body.decode(),
        "peer": request.peer,
    }
    return Response(200, json.dumps(body).encode())


# ------------------------------------------------------------------- raw HTTP helpers
class Raw:
    """A raw HTTP/1.1 client connection that reads responses one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection(HOST, port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n"), WAIT)

    async def head(self) -> tuple[int, dict[str, str]]:
        status = int((await self.line()).split()[1])
        headers: dict[str, str] = {}
        while (line := await self.line()) != b"\r\n":
            name, value = line.decode("latin-1").split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def chunk(self) -> bytes:
        """One chunk of a chunked body (b"" for the last one)."""
        size = int(await self.line(), 16)
        data = await asyncio.wait_for(self.reader.readexactly(size + 2), WAIT)
        assert data.endswith(b"\r\n")
        return data[:-2]

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        if "content-length" in headers:
            body = await asyncio.wait_for(
                self.reader.readexactly(int(headers["content-length"])), WAIT
            )
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while part := await self.chunk():
                parts.append(part)
            body = b"".join(parts)
        else:
            body = await asyncio.wait_for(self.reader.read(), WAIT)
        return status, headers, body

    async def at_eof(self) -> bool:
        """True once the server has closed the connection (no further bytes)."""
        return await asyncio.wait_for(self.reader.read(), WAIT) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def assert_openai_error(body: bytes, kind: str = "invalid_request_error", code: str | None = None) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["param"] is None and error["code"] == code
    assert error["message"]
    return str(error["message"])


# -------------------------------------------------------------------------------- tests
async def test_get_and_post_json_through_aiohttp(start: Start) -> None:
    port = await start(echo)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{HOST}:{port}/v1/mod%20els?limit=2&x=%20") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            assert "Date" in resp.headers
            got = await resp.json()
        assert got["method"] == "GET"
        assert got["path"] == "/v1/mod els"
        assert got["query"] == "limit=2&x=%20"
        assert got["body"] == ""
        payload = {"model": "m", "messages": [{"role": "user", "content": "hé"}]}
        headers = {"Authorization": "Bearer k", "X-Custom": "v"}
        async with session.post(
            f"http://{HOST}:{port}/v1/chat/completions", json=payload, headers=headers
        ) as resp:
            assert resp.status == 200
            got = await resp.json()
    assert got["method"] == "POST"
    assert json.loads(got["body"]) == payload
    assert got["headers"]["authorization"] == "Bearer k"
    assert got["headers"]["x-custom"] == "v"
    assert got["headers"]["content-type"] == "application/json"
    host, _, client_port = got["peer"].rpartition(":")
    assert host == HOST and int(client_port) > 0


async def test_keep_alive_serves_several_requests_on_one_connection(start: Start) -> None:
    port = await start(echo)
    raw = await Raw.open(port)
    own = "%s:%d" % raw.writer.get_extra_info("sockname")[:2]
    for i in range(3):
        raw.send(post(f"/r{i}", b'{"i": %d}' % i))
        status, headers, body = await raw.response()
        assert status == 200 and "connection" not in headers
        got = json.loads(body)
        assert got["path"] == f"/r{i}" and got["body"] == '{"i": %d}' % i
        assert got["peer"] == own  # the very same TCP connection every time
    await raw.close()


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(start: Start) -> None:
    running = 0
    most = 0

    async def slow_first(request: Request) -> Response:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep({"/1": 0.15, "/2": 0.05, "/3": 0.0}[request.path])
        running -= 1
        return Response(200, request.path.encode(), "text/plain")

    port = await start(slow_first)
    raw = await Raw.open(port)
    raw.send(get("/1") + get("/2") + get("/3"))  # one write: all three in flight at once
    bodies = [(await raw.response())[2] for _ in range(3)]
    assert bodies == [b"/1", b"/2", b"/3"]
    assert most == 1
    await raw.close()


async def test_chunked_request_body_is_reassembled(start: Start) -> None:
    port = await start(echo)
    raw = await Raw.open(port)
    raw.send(b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await asyncio.sleep(0.05)  # the rest in a second segment
    raw.send(b"6\r\n world\r\n0\r\n\r\n")
    status, _, body = await raw.response()
    assert status == 200 and json.loads(body)["body"] == "hello world"
    await raw.close()


async def test_expect_100_continue_is_answered_before_the_body(start: Start) -> None:
    port = await start(echo)
    raw = await Raw.open(port)
    raw.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await raw.line() == b"HTTP/1.1 100 Continue\r\n"
    assert await raw.line() == b"\r\n"
    raw.send(b"hi")
    status, _, body = await raw.response()
    assert status == 200 and json.loads(body)["body"] == "hi"
    await raw.close()


async def test_sse_chunks_are_delivered_as_they_are_yielded(start: Start) -> None:
    release = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        await release.wait()  # the client must see "one" before "two" exists
        yield b"data: two\n\n"
        yield b"data: [DONE]\n\n"

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, events())

    port = await start(handler)
    raw = await Raw.open(port)
    raw.send(get("/v1/chat/completions"))
    status, headers = await raw.head()
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked"
    assert await raw.chunk() == b"data: one\n\n"
    release.set()
    assert await raw.chunk() == b"data: two\n\n"
    assert await raw.chunk() == b"data: [DONE]\n\n"
    assert await raw.chunk() == b""  # properly terminated ...
    raw.send(get("/again"))  # ... so the connection is reusable
    release.clear()
    status, _ = await raw.head()
    assert status == 200 and await raw.chunk() == b"data: one\n\n"
    release.set()
    await raw.close()


async def test_sse_through_aiohttp_client(start: Start) -> None:
    async def events() -> AsyncIterator[bytes]:
        for i in range(16):
            yield b"data: %d\n\n" % i

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, events(), headers=(("cache-control", "no-cache"),))

    port = await start(handler)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{HOST}:{port}/s", json={}) as resp:
            assert resp.headers["Cache-Control"] == "no-cache"
            lines = [line async for line in resp.content if line.strip()]
    assert lines == [b"data: %d\n" % i for i in range(16)]


async def test_stream_mixing_ready_and_waiting_chunks_arrives_intact(start: Start) -> None:
    async def events() -> AsyncIterator[bytes]:
        for i in range(40):
            if i % 3 == 0:
                await asyncio.sleep(0.001)  # a real wait on a timer future
            elif i % 3 == 1:
                await asyncio.sleep(0)  # a bare yield to the loop
            yield b"data: %d\n\n" % i
            yield b""  # empty chunks are skipped, not sent as the terminator

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, events())

    port = await start(handler)
    raw = await Raw.open(port)
    for _ in range(2):  # and the connection is reusable after it
        raw.send(get("/s"))
        status, _, body = await raw.response()
        assert status == 200 and body == b"".join(b"data: %d\n\n" % i for i in range(40))
    await raw.close()


async def test_stream_failing_before_its_first_chunk_gives_500(start: Start) -> None:
    async def events() -> AsyncIterator[bytes]:
        raise RuntimeError("upstream refused")
        yield b"never"

    async def handler(request: Request) -> Response | StreamingResponse:
        if request.path == "/ok":
            return Response(200, b"{}")
        return StreamingResponse(200, events())

    port = await start(handler)
    raw = await Raw.open(port)
    raw.send(get("/s"))
    status, _, body = await raw.response()
    assert status == 500
    assert_openai_error(body, "server_error", "internal_error")
    raw.send(get("/ok"))
    assert (await raw.response())[0] == 200
    await raw.close()


async def test_stream_failing_midway_is_left_unterminated(start: Start) -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await asyncio.sleep(0.01)
        raise RuntimeError("node died")

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, events())

    port = await start(handler)
    raw = await Raw.open(port)
    raw.send(get("/s"))
    assert (await raw.head())[0] == 200
    assert await raw.chunk() == b"data: 1\n\n"
    assert await raw.at_eof()  # closed without the 0-length chunk: the client sees an error
    await raw.close()


def _accepted_socket_nodelay(server_port: int, client: tuple[str, int]) -> int:
    """TCP_NODELAY of the server's accepted socket for ``client``, found among this
    process's descriptors (server and client share the process)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        with sock:
            try:
                if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                    continue
                if sock.getsockname() == (HOST, server_port) and sock.getpeername() == client:
                    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            except OSError:
                continue  # the listener has no peer
    raise AssertionError("accepted socket not found")


async def test_tcp_nodelay_is_set_on_the_accepted_socket(start: Start) -> None:
    port = await start(echo)
    raw = await Raw.open(port)
    raw.send(get("/"))
    await raw.response()  # the connection has certainly been accepted
    client = raw.writer.get_extra_info("sockname")[:2]
    assert _accepted_socket_nodelay(port, client) != 0
    await raw.close()


async def test_client_disconnect_mid_stream_closes_the_generator(start: Start) -> None:
    cleaned = asyncio.Event()
    forever = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: first\n\n"
            await forever.wait()  # an upstream token that never comes
            yield b"data: never\n\n"
        finally:
            cleaned.set()  # where the router cancels the node request

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, events())

    port = await start(handler)
    raw = await Raw.open(port)
    raw.send(get("/stream"))
    await raw.head()
    assert await raw.chunk() == b"data: first\n\n"
    assert _server_tasks()  # the stream is being served ...
    await raw.close()
    await asyncio.wait_for(cleaned.wait(), 1.0)  # ... and its cleanup runs promptly
    await asyncio.sleep(0.01)
    assert not _server_tasks()


async def test_client_disconnect_while_the_stream_waits_on_a_slow_reader(start: Start) -> None:
    """Here the server, not the generator, is waiting (for the socket to drain) when the
    client goes; the generator must still be closed, even though it is referenced
    elsewhere (so garbage collection would never finalize it)."""
    cleaned = asyncio.Event()
    kept: list[AsyncIterator[bytes]] = []

    async def events() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
        finally:
            cleaned.set()

    async def handler(request: Request) -> StreamingResponse:
        kept.append(events())
        return StreamingResponse(200, kept[-1], "application/octet-stream")

    port = await start(handler)
    raw = await Raw.open(port)
    raw.send(get("/big"))
    await raw.head()
    await asyncio.sleep(0.2)  # buffers fill; the server is now paused in its drain
    assert not cleaned.is_set()
    raw.writer.transport.abort()  # reset, as a crashed client would
    await asyncio.wait_for(cleaned.wait(), 1.0)
    await raw.close()


async def test_client_disconnect_cancels_a_running_handler(start: Start) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    port = await start(stuck)
    raw = await Raw.open(port)
    raw.send(get("/"))
    await asyncio.wait_for(started.wait(), WAIT)
    await raw.close()
    await asyncio.wait_for(cancelled.wait(), 1.0)


async def test_slow_reader_makes_the_stream_wait(start: Start) -> None:
    chunk = b"x" * 65536
    total = 1024  # 64 MiB: far more than the socket buffers can hold
    produced = 0

    async def events() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(total):
            produced += 1
            yield chunk

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, events(), "application/octet-stream")

    port = await start(handler)
    raw = await Raw.open(port)
    raw.send(get("/big"))
    await asyncio.sleep(0.3)  # the client reads nothing meanwhile
    stalled_at = produced
    await asyncio.sleep(0.2)
    assert produced == stalled_at < total // 4  # paused, not buffering the whole stream
    status, _, body = await raw.response()  # reading lets it resume, to the end
    assert status == 200 and len(body) == total * len(chunk) and produced == total
    await raw.close()


async def test_malformed_request_gets_400_and_close(start: Start) -> None:
    port = await start(echo)
    raw = await Raw.open(port)
    raw.send(b"NOT AN HTTP REQUEST\r\n\r\n")
    status, headers, body = await raw.response()
    assert status == 400 and headers["connection"] == "close"
    assert "malformed" in assert_openai_error(body)
    assert await raw.at_eof()
    await raw.close()


async def test_requests_before_a_malformed_one_are_still_answered(start: Start) -> None:
    port = await start(echo)
    raw = await Raw.open(port)
    raw.send(get("/ok") + b"GET /bad path HTTP/1.1\r\n\r\n")
    status, _, body = await raw.response()
    assert status == 200 and json.loads(body)["path"] == "/ok"
    assert (await raw.response())[0] == 400
    assert await raw.at_eof()
    await raw.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_oversized_body_gets_413(start: Start, framing: str) -> None:
    called = False

    async def handler(request: Request) -> Response:
        nonlocal called
        called = True
        return Response(200)

    port = await start(handler, max_body_bytes=1024)
    raw = await Raw.open(port)
    if framing == "content-length":
        # Refused on the declared length, before any of the body is sent.
        raw.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\n\r\n")
    else:
        big = b"%x\r\n%s\r\n" % (600, b"a" * 600)
        raw.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + big * 2)
    status, headers, body = await raw.response()
    assert status == 413 and headers["connection"] == "close"
    assert "1024" in assert_openai_error(body)
    assert await raw.at_eof()
    assert not called
    await raw.close()


async def test_a_body_at_the_limit_is_accepted(start: Start) -> None:
    port = await start(echo, max_body_bytes=1024)
    raw = await Raw.open(port)
    raw.send(post("/", b"a" * 1024))
    status, _, body = await raw.response()
    assert status == 200 and len(json.loads(body)["body"]) == 1024
    await raw.close()


async def test_handler_exception_gives_500_and_the_connection_survives(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    async def flaky(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("kaboom")
        return Response(200, b'{"ok": true}')

    port = await start(flaky)
    raw = await Raw.open(port)
    with caplog.at_level(logging.ERROR, logger=http_server.__name__):
        raw.send(get("/boom"))
        status, headers, body = await raw.response()
    assert status == 500 and "connection" not in headers
    assert_openai_error(body, "server_error", "internal_error")
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in caplog.records)
    raw.send(get("/fine"))  # same connection
    status, _, body = await raw.response()
    assert status == 200 and body == b'{"ok": true}'
    await raw.close()


async def test_header_injection_from_a_handler_becomes_500(start: Start) -> None:
    async def bad(request: Request) -> Response:
        return Response(200, b"{}", headers=(("x-evil", "a\r\nset-cookie: x=y"),))

    port = await start(bad)
    raw = await Raw.open(port)
    raw.send(get("/"))
    status, headers, _ = await raw.response()
    assert status == 500 and "set-cookie" not in headers
    await raw.close()


async def test_http10_closes_after_the_response(start: Start) -> None:
    port = await start(echo)
    raw = await Raw.open(port)
    raw.send(b"GET /old HTTP/1.0\r\n\r\n")
    status, headers, body = await raw.response()
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["path"] == "/old"
    assert await raw.at_eof()
    await raw.close()


async def test_idle_keep_alive_connection_is_closed(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "_TICK", 0.02)
    monkeypatch.setattr(http_server, "_SWEEP_EVERY", 1)
    monkeypatch.setattr(http_server, "IDLE_TIMEOUT", 5)  # ticks: 0.1 s here
    port = await start(echo)
    raw = await Raw.open(port)
    raw.send(get("/"))
    assert (await raw.response())[0] == 200
    assert await raw.at_eof()  # within WAIT, although the client never closes
    await raw.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Wait (up to WAIT) for a condition on server state that no event announces."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT)


async def test_connections_over_the_limit_get_503_and_a_closed_one_frees_its_slot() -> None:
    calls = 0

    async def counting(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return Response(200, b"{}")

    server = await serve(counting, HOST, 0, max_connections=2)
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        served = await Raw.open(port)
        served.send(get("/"))
        assert (await served.response())[0] == 200  # idle now, and still counted
        silent = await Raw.open(port)  # connected, has sent nothing: counted too
        await _until(lambda: server.open_connections == 2)  # type: ignore[attr-defined]
        over = await Raw.open(port)
        over.send(get("/never-parsed"))
        status, headers, body = await over.response()
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert "limit of 2 open connections" in assert_openai_error(body, "server_error", "too_many_connections")
        assert await over.at_eof()
        assert calls == 1 and server.refused_connections == 1  # type: ignore[attr-defined]
        served.send(get("/again"))  # the two admitted connections are unaffected
        assert (await served.response())[0] == 200
        await served.close()
        await _until(lambda: server.open_connections == 1)  # type: ignore[attr-defined]
        fresh = await Raw.open(port)
        fresh.send(get("/"))
        assert (await fresh.response())[0] == 200
        assert calls == 3
        for raw in (silent, over, fresh):
            await raw.close()
    finally:
        await shutdown(server, grace=1.0)


async def test_a_burst_of_connections_never_exceeds_the_limit(start: Start) -> None:
    """asyncio accepts a burst before the first connection_made: the count must be kept
    at accept, or a burst slips past the limit."""
    release = asyncio.Event()
    entered = 0

    async def hold(request: Request) -> Response:
        nonlocal entered
        entered += 1
        await release.wait()
        return Response(200, b"{}")

    port = await start(hold, max_connections=5)
    clients = await asyncio.gather(*(Raw.open(port) for _ in range(40)))
    for raw in clients:
        raw.send(get("/"))
    firsts = [asyncio.create_task(raw.reader.readexactly(12)) for raw in clients]
    await _until(lambda: sum(t.done() for t in firsts) >= 35)  # the refusals come at once
    assert [t.result() for t in firsts if t.done()] == [b"HTTP/1.1 503"] * 35
    assert entered <= 5 and sum(t.done() for t in firsts) == 35  # the others wait on `hold`
    release.set()
    for t in firsts:
        assert await asyncio.wait_for(t, WAIT) in (b"HTTP/1.1 503", b"HTTP/1.1 200")
    assert entered == 5
    for raw in clients:
        await raw.close()


async def test_no_connection_limit_when_zero(start: Start) -> None:
    port = await start(echo, max_connections=0)
    clients = [await Raw.open(port) for _ in range(20)]
    for raw in clients:
        raw.send(get("/"))
    for raw in clients:
        assert (await raw.response())[0] == 200
        await raw.close()
    with pytest.raises(ValueError, match="max_connections"):
        await serve(echo, HOST, 0, max_connections=-1)


async def test_a_slow_request_head_gets_408_and_a_keep_alive_client_does_not(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "_TICK", 0.02)
    monkeypatch.setattr(http_server, "_SWEEP_EVERY", 1)
    monkeypatch.setattr(http_server, "IDLE_TIMEOUT", 100_000)  # ticks: only the header deadline acts
    port = await start(echo, header_timeout=0.2)  # 10 ticks
    keep = await Raw.open(port)
    keep.send(get("/first"))
    assert (await keep.response())[0] == 200

    slow = await Raw.open(port)
    silent = await Raw.open(port)  # connects and never sends a byte
    second = await Raw.open(port)  # a first request at once, the second one trickled
    second.send(get("/quick"))
    assert (await second.response())[0] == 200
    closed = asyncio.Event()

    async def trickle(raw: Raw) -> None:  # one header byte per tick: each resets the idle clock
        for byte in b"GET /slow HTTP/1.1\r\nX-Slow: " + b"a" * 100_000:
            if closed.is_set() or raw.writer.is_closing():
                return
            raw.send(bytes([byte]))
            await asyncio.sleep(0.02)

    trickling = [asyncio.create_task(trickle(raw)) for raw in (slow, second)]
    try:
        for late in (slow, silent, second):
            status, headers, body = await late.response()
            assert status == 408 and headers["connection"] == "close"
            assert "did not arrive within 0.2 s" in assert_openai_error(body, "timeout_error")
            assert await late.at_eof()
    finally:
        closed.set()
        await asyncio.gather(*trickling)
    # The keep-alive client idled longer than the header timeout since its last answer:
    # that is idleness, not a late head, and its connection still serves.
    keep.send(get("/second"))
    status, _, body = await keep.response()
    assert status == 200 and json.loads(body)["path"] == "/second"
    for raw in (keep, slow, silent, second):
        await raw.close()


async def test_a_request_head_in_pieces_within_the_deadline_is_served(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "_TICK", 0.02)
    monkeypatch.setattr(http_server, "_SWEEP_EVERY", 1)
    port = await start(echo, header_timeout=60.0)
    raw = await Raw.open(port)
    for piece in (b"GET /pieces HTTP/1.1\r\n", b"Host: t\r\n", b"\r\n"):
        raw.send(piece)
        await asyncio.sleep(0.05)  # several sweeps between pieces
    status, _, body = await raw.response()
    assert status == 200 and json.loads(body)["path"] == "/pieces"
    await raw.close()


async def test_shutdown_finishes_in_flight_work_then_closes(start: Start) -> None:
    started = asyncio.Event()

    async def slow(request: Request) -> Response:
        if request.path == "/slow":
            started.set()
            await asyncio.sleep(1.5)
        return Response(200, b"done", "text/plain")

    server = await serve(slow, HOST, 0)
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    idle, busy = await Raw.open(port), await Raw.open(port)
    idle.send(get("/quick"))
    await idle.response()
    busy.send(get("/slow"))
    await asyncio.wait_for(started.wait(), WAIT)
    closing = asyncio.create_task(shutdown(server, grace=2.0))
    # Idle keep-alive connections go at once, long before the slow request is done.
    assert await asyncio.wait_for(idle.reader.read(), 1.0) == b""
    status, headers, body = await busy.response()  # in-flight work completes ...
    assert (status, body) == (200, b"done") and headers["connection"] == "close"
    assert await busy.at_eof()  # ... and then its connection closes
    await asyncio.wait_for(closing, WAIT)
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, port)  # no longer accepting
    for raw in (idle, busy):
        await raw.close()


async def test_shutdown_cancels_what_outlives_the_grace(start: Start) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(request: Request) -> Response:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    server = await serve(stuck, HOST, 0)
    raw = await Raw.open(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    raw.send(get("/"))
    await asyncio.wait_for(entered.wait(), WAIT)
    await asyncio.wait_for(shutdown(server, grace=0.1), WAIT)
    assert cancelled.is_set() and not _server_tasks()
    assert await raw.at_eof()
    await raw.close()


def test_runs_on_uvloop() -> None:
    """The benchmark and production run on uvloop, whose transports differ from
    asyncio's (e.g. the socket is a pseudo-socket): serve from a uvloop thread."""
    cleaned = threading.Event()
    ready: list[int] = []
    loop = uvloop.new_event_loop()

    async def handler(request: Request) -> Response | StreamingResponse:
        if request.path == "/json":
            return Response(200, b'{"ok": true}')

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b"data: 1\n\n"
                await asyncio.Event().wait()
            finally:
                cleaned.set()

        return StreamingResponse(200, events())

    async def start_server() -> asyncio.AbstractServer:
        server = await serve(handler, HOST, 0)
        ready.append(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return server

    server = loop.run_until_complete(start_server())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection((HOST, ready[0]), timeout=WAIT) as client:
            client.sendall(get("/json"))
            data = b""
            while not data.endswith(b'{"ok": true}'):
                data += client.recv(4096)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert _accepted_socket_nodelay(ready[0], client.getsockname()) != 0
            client.sendall(get("/stream"))
            data = b""
            while b"data: 1" not in data:
                data += client.recv(4096)
        assert cleaned.wait(2.0)  # disconnect closed the generator on uvloop too
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(server, 1.0), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


def test_connection_limit_and_header_deadline_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop creates protocols and transports its own way (its transports are not
    asyncio.Transport subclasses): the limit and the 408 must hold there too."""
    monkeypatch.setattr(http_server, "_TICK", 0.02)
    monkeypatch.setattr(http_server, "_SWEEP_EVERY", 1)
    results: dict[str, object] = {}

    async def scenario() -> None:
        release = asyncio.Event()

        async def hold(request: Request) -> Response:
            await release.wait()
            return Response(200, b"{}")

        server = await serve(hold, HOST, 0, max_connections=3, header_timeout=0.2)
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        try:
            clients = [await Raw.open(port) for _ in range(3)]
            await _until(lambda: server.open_connections == 3)  # type: ignore[attr-defined]
            clients += [Raw(*pair) for pair in await asyncio.gather(*(asyncio.open_connection(HOST, port) for _ in range(9)))]
            for raw in clients[:2]:
                raw.send(get("/"))
            # clients[2] sends nothing: it holds its slot until the header deadline.
            firsts = [asyncio.create_task(raw.reader.readexactly(12)) for raw in clients]
            await _until(lambda: sum(t.done() for t in firsts) >= 9)
            results["refused"] = sorted(i for i, t in enumerate(firsts) if t.done() and t.result() == b"HTTP/1.1 503")
            results["late"] = await asyncio.wait_for(firsts[2], WAIT)
            results["counted"] = (server.refused_connections, server.late_request_heads)  # type: ignore[attr-defined]
            release.set()
            results["held"] = [await asyncio.wait_for(firsts[i], WAIT) for i in (0, 1)]
            for raw in clients:
                await raw.close()
        finally:
            await shutdown(server, grace=1.0)

    def run() -> None:
        try:
            uvloop.run(scenario())
        except BaseException as exc:  # reported below, on the test's thread
            results["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(4 * WAIT)
    assert not thread.is_alive()
    assert "error" not in results, results.get("error")
    assert results["refused"] == list(range(3, 12))
    assert results["late"] == b"HTTP/1.1 408"
    assert results["counted"] == (9, 1)
    assert results["held"] == [b"HTTP/1.1 200"] * 2
