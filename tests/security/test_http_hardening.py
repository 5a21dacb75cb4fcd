"""The HTTP front door against clients that hold resources: per-address connection caps,
exact header deadlines, body deadlines with a minimum rate, and authentication before a
body is read. Real sockets on 127.0.0.x against `http_server.serve`, no fabric."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tierflow.services.router import http_server
from tierflow.services.router.http_server import Request, Response

HOST = "127.0.0.1"
WAIT = 5.0

Start = Callable[..., Awaitable[int]]


@pytest.fixture
def start(start_http: Start) -> Start:
    return start_http


async def echo(request: Request) -> Response:
    return Response(200, json.dumps({"path": request.path, "size": len(request.body), "auth": request.auth}).encode())


async def _open(port: int, source: str = HOST) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, local_addr=(source, 0))


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), WAIT)
    return int(lines[0].split()[1]), headers, body


def _error(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


async def _closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), WAIT) == b""


async def _until(check: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT)


async def test_one_address_cannot_take_every_slot(start: Start) -> None:
    port = await start(echo, max_connections_per_client=2)
    held = [await _open(port) for _ in range(2)]
    over_r, over_w = await _open(port)
    status, headers, body = await _response(over_r)
    assert status == 503 and headers["retry-after"] == "1"
    assert "your address has 2 connections open" in _error(body)["message"]
    assert await _closed(over_r)
    # Another address is served meanwhile; a freed slot serves the first address again.
    other_r, other_w = await _open(port, "127.0.0.2")
    other_w.write(b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await _response(other_r))[0] == 200
    held[0][1].close()
    await asyncio.sleep(0.05)
    again_r, again_w = await _open(port)
    again_w.write(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await _response(again_r))[0] == 200
    for _, writer in (*held, (over_r, over_w), (other_r, other_w), (again_r, again_w)):
        writer.close()


async def test_the_header_deadline_is_kept_to_the_millisecond_not_the_sweep(start: Start) -> None:
    """A silent connection and a trickling one both get 408 at the deadline (the timer
    is armed for the earliest head, not a sweep every few seconds)."""
    port = await start(echo, header_timeout=0.3)
    began = time.monotonic()
    silent_r, silent_w = await _open(port)
    trickle_r, trickle_w = await _open(port)
    trickle_w.write(b"GET /slow HTTP/1.1\r\nX-Slow: ")

    async def trickle() -> None:
        while not trickle_w.is_closing():
            trickle_w.write(b"a")
            await asyncio.sleep(0.02)

    task = asyncio.create_task(trickle())
    try:
        for reader in (silent_r, trickle_r):
            status, _, body = await _response(reader)
            assert status == 408 and _error(body)["type"] == "timeout_error"
        took = time.monotonic() - began
        assert 0.28 <= took < 0.6, took
    finally:
        trickle_w.close()
        silent_w.close()
        task.cancel()


async def test_a_body_slower_than_its_deadline_gets_408_one_at_the_minimum_rate_is_served(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "_TICK", 0.02)  # the body check runs every tick
    port = await start(echo, body_timeout=0.2, min_body_rate=20_000)
    slow_r, slow_w = await _open(port)
    slow_w.write(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
    began = time.monotonic()
    status, headers, body = await _response(slow_r)
    assert status == 408 and headers["connection"] == "close"
    assert "request body did not arrive" in _error(body)["message"]
    assert time.monotonic() - began < 1.0

    steady_r, steady_w = await _open(port)  # 6 KB at ~30 KB/s: past 0.2 s, but keeping the rate
    steady_w.write(b"POST /steady HTTP/1.1\r\nHost: t\r\nContent-Length: 6000\r\n\r\n")
    for _ in range(6):
        steady_w.write(b"y" * 1000)
        await asyncio.sleep(0.05)
    status, _, body = await _response(steady_r)
    assert status == 200 and json.loads(body)["size"] == 6000
    for writer in (slow_w, steady_w):
        writer.close()


async def test_a_wrong_key_is_refused_before_the_body_is_read(start: Start) -> None:
    bodies: list[int] = []

    async def handler(request: Request) -> Response:
        bodies.append(len(request.body))
        return await echo(request)

    def authorize(method: str, path: str, headers: dict[str, str]) -> object:
        if headers.get("authorization") != "Bearer good":
            return Response(401, b'{"error": {"message": "no", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}')
        return {"tenant": "t1"}

    port = await start(handler, authorize=authorize)
    reader, writer = await _open(port)
    # A head announcing 8 MB, of which nothing is sent: the 401 comes anyway, at once.
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer bad\r\nContent-Length: 8000000\r\n\r\n")
    status, headers, body = await _response(reader)
    assert status == 401 and headers["connection"] == "close" and _error(body)["code"] == "invalid_api_key"
    writer.write(b"z" * 100_000)  # what the client sends afterwards is discarded unread
    assert await _closed(reader)
    writer.close()

    good_r, good_w = await _open(port)
    good_w.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer good\r\nContent-Length: 2\r\n\r\n{}")
    status, _, body = await _response(good_r)
    assert status == 200 and json.loads(body)["auth"] == {"tenant": "t1"}
    assert bodies == [2]
    good_w.close()


async def test_limits_refuse_nonsense(start: Start) -> None:
    with pytest.raises(ValueError, match="max_connections_per_client"):
        await start(echo, max_connections_per_client=-1)
    with pytest.raises(ValueError, match="body_timeout"):
        await start(echo, body_timeout=float("nan"))


async def test_the_router_refuses_a_wrong_key_before_reading_the_body(start: Start) -> None:
    """The OpenAI API's own `authorize` on the real server: a wrong key is a 401 in
    OpenAI's shape as soon as the head is in; a right one reaches the body's checks."""
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from tierflow.placement import LeastLoaded, SessionTable
    from tierflow.placement.tables import ModelTable, NodeTable
    from tierflow.runtime.clock import VirtualClock
    from tierflow.services.router.config import load_router_config
    from tierflow.services.router.dispatch import Dispatcher
    from tierflow.services.router.metrics import RouterMetrics
    from tierflow.services.router.openai_api import OpenAIApi

    config = load_router_config(str(Path(__file__).resolve().parents[1] / "fleets" / "router-tenants.yaml"))
    clock, metrics, nodes, models = VirtualClock(), RouterMetrics(CollectorRegistry()), NodeTable(), ModelTable()
    dispatcher = Dispatcher(nodes, models, None, clock, metrics, policy=LeastLoaded(), tenants=config.tenants, sessions=SessionTable(10))  # type: ignore[arg-type]  # no node is ever reached
    api = OpenAIApi(dispatcher, models, nodes, clock, metrics, CollectorRegistry(), nats_connected=lambda: True)
    port = await start(api.handle, authorize=api.authorize)

    reader, writer = await _open(port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-wrong\r\nContent-Length: 8000000\r\n\r\n")
    status, _, body = await _response(reader)
    assert status == 401 and _error(body) == {"message": "Incorrect API key provided.", "type": "authentication_error", "param": None, "code": "invalid_api_key"}
    writer.close()

    reader, writer = await _open(port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-globex\r\nContent-Length: 5\r\n\r\n[1,2]")
    status, _, body = await _response(reader)
    assert status == 400 and "object" in _error(body)["message"]  # past the key, stopped by the body's shape
    writer.close()
    assert metrics.errors.labels("-", "invalid_api_key")._value.get() == 1  # counted like any refusal
