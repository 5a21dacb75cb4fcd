"""The architecture's floor: an HTTP front door that does nothing but carry bytes over NATS.

The fabric's request path is HTTP -> router -> NATS -> node -> NATS -> router -> HTTP.
This is that path with every piece of the fabric's own work taken out: the front door
parses HTTP (httptools, uvloop, TCP_NODELAY), sends the raw body as one NATS request
(nats-py's `request`), and writes the reply bytes back; the responder answers every
request with the zero backend's whole HTTP response (`backend.BackendProtocol._answer`,
SSE included, so a stream is one message: coalescing at its best). No validation,
placement, records, metrics or spans.

Its req/s and CPU per request bound what any router built on this architecture (Python,
nats-py, nats-server, Python node) can reach on this machine; `frontdoor.py` prints its
ratio to vllm-router beside the fabric's, so the issue's bounds can be read against
what is reachable at all.

    python floor.py front --nats nats://127.0.0.1:4222 --port 18001
    python floor.py responder --nats nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

import httptools
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backend import BackendProtocol  # run as a script: this directory is on sys.path

SUBJECT = "frontdoor.floor"
_BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"


class FrontProtocol(asyncio.Protocol):
    """One keep-alive client connection; each request becomes one NATS request."""

    __slots__ = ("_body", "_nc", "_parser", "_transport", "_url")

    def __init__(self, nc: nats.NATS) -> None:
        self._nc = nc
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        # the path and method travel in the payload's first line, the body after it
        head = b"%s %s\n" % (self._parser.get_method(), self._url)
        payload = head + b"".join(self._body)
        self._url, self._body = b"", []
        asyncio.ensure_future(self._forward(payload))

    async def _forward(self, payload: bytes) -> None:
        try:
            reply = (await self._nc.request(SUBJECT, payload, timeout=10)).data
        except Exception:  # noqa: BLE001 - the floor answers 502 and goes on
            reply = _BAD_GATEWAY
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)


async def front(nats_url: str, host: str, port: int) -> None:
    nc = await nats.connect(nats_url)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FrontProtocol(nc), host, port, backlog=1024, reuse_address=True)
    print(f"floor front door on {host}:{port}", flush=True)
    await server.serve_forever()


async def responder(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    answer = BackendProtocol()._answer  # the zero backend's whole HTTP response

    async def on_request(msg: nats.aio.msg.Msg) -> None:
        head, _, body = msg.data.partition(b"\n")
        method, _, url = head.partition(b" ")
        await nc.publish(msg.reply, answer(method, url.split(b"?", 1)[0], body))

    await nc.subscribe(SUBJECT, cb=on_request)
    print("floor responder subscribed", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("front", "responder"))
    parser.add_argument("--nats", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18001)
    args = parser.parse_args()
    import uvloop

    try:
        uvloop.run(front(args.nats, args.host, args.port) if args.role == "front" else responder(args.nats))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
