"""A zero-compute OpenAI-shaped HTTP server: the floor every front door is measured against.

`POST /v1/chat/completions` answers at once: non-streaming, one `chat.completion` with
`max_tokens` one-word tokens; with `"stream": true`, `max_tokens` SSE chunks (one token
each, like vLLM), a final chunk with `finish_reason`, a usage chunk when
`stream_options.include_usage` asks for it, and `data: [DONE]`, written in one go. Also
`GET /health` and `GET /v1/models`, which vllm-router probes before it routes.

Lean on purpose (an asyncio Protocol with httptools' parser, uvloop when importable,
responses rendered from pre-built pieces), so that the backend is not what limits a
benchmark: its CPU per request is reported beside the routers'. It runs as its own
process:

    .venv/bin/python loadtest/frontdoor/backend.py --port 18000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

import httptools
import msgspec

__all__ = ["BackendProtocol", "ChatBody", "render_chat", "render_stream", "serve"]

TOKEN = " hi"  # every token is the same word: nothing to compute
_ids = itertools.count(1)


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatBody(msgspec.Struct):
    """The fields of a chat request the answer depends on (the rest is ignored)."""

    model: str = "zero"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    messages: list[msgspec.Raw] = []

    @property
    def tokens(self) -> int:
        n = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        return max(1, 16 if n is None else n)


_decode_chat = msgspec.json.Decoder(ChatBody).decode
_encode = msgspec.json.encode


def _usage(prompt: int, completion: int) -> bytes:
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        prompt,
        completion,
        prompt + completion,
    )


def render_chat(body: ChatBody, request_id: str, created: int) -> bytes:
    """The JSON of a non-streaming `chat.completion`."""
    n = body.tokens
    return (b'{"id":"chatcmpl-%s","object":"chat.completion","created":%d,"model":%s,"choices":[{"index":0,'
            b'"message":{"role":"assistant","content":%s},"logprobs":null,"finish_reason":"length"}],"usage":%s}'
            % (request_id.encode(), created, _encode(body.model), _encode(TOKEN * n), _usage(len(body.messages), n)))  # fmt: skip


def render_stream(body: ChatBody, request_id: str, created: int) -> bytes:
    """The whole SSE body of a streamed chat completion, one token per chunk."""
    head = (
        b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":[{"index":0,'
        % (request_id.encode(), created, _encode(body.model))
    )
    usage = body.stream_options is not None and body.stream_options.include_usage
    tail = (
        b',"logprobs":null,"finish_reason":%s}]'
        + (b',"usage":null' if usage else b"")
        + b"}\n\n"
    )
    token = head + b'"delta":{"content":' + _encode(TOKEN) + b"}" + tail % b"null"
    parts = [head + b'"delta":{"role":"assistant","content":""}' + tail % b"null", token * body.tokens,
             head + b'"delta":{}' + tail % b'"length"']  # fmt: skip
    if usage:
        parts.append(b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":[],"usage":%s}\n\n'
                     % (request_id.encode(), created, _encode(body.model), _usage(len(body.messages), body.tokens)))  # fmt: skip
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


_MODELS = b'{"object":"list","data":[{"id":"zero","object":"model","created":0,"owned_by":"frontdoor"}]}'


def _response(
    status: bytes, body: bytes, content_type: bytes = b"application/json"
) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        content_type,
        len(body),
        body,
    )


def _chunked(body: bytes) -> bytes:
    """An SSE response in chunked encoding (one chunk: the body is all there already)."""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))  # fmt: skip


class BackendProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; answers each request as soon as it is parsed."""

    __slots__ = ("_body", "_parser", "_transport", "_url")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.write(
                _response(b"400 Bad Request", b'{"error":{"message":"bad request"}}')
            )
            self._transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url, body = self._url, b"".join(self._body)
        self._url, self._body = b"", []
        assert self._transport is not None
        self._transport.write(
            self._answer(self._parser.get_method(), url.split(b"?", 1)[0], body)
        )
        if not self._parser.should_keep_alive():
            self._transport.close()

    def _answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"POST" and path == b"/v1/chat/completions":
            try:
                chat = _decode_chat(body)
            except msgspec.DecodeError as exc:
                return _response(
                    b"400 Bad Request", b'{"error":{"message":%s}}' % _encode(str(exc))
                )
            request_id, created = str(next(_ids)), int(time.time())
            return (
                _chunked(render_stream(chat, request_id, created))
                if chat.stream
                else _response(b"200 OK", render_chat(chat, request_id, created))
            )
        if method == b"GET" and path in (b"/health", b"/healthz"):
            return _response(b"200 OK", b"")
        if method == b"GET" and path == b"/v1/models":
            return _response(b"200 OK", _MODELS)
        return _response(b"404 Not Found", b'{"error":{"message":"not found"}}')


async def serve(host: str, port: int) -> asyncio.Server:
    """Listen on host:port (port 0: any free port; read it from the server's sockets)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        BackendProtocol, host, port, backlog=1024, reuse_address=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18000)
    args = parser.parse_args()

    async def run() -> None:
        server = await serve(args.host, args.port)
        print(
            f"zero backend listening on {args.host}:{server.sockets[0].getsockname()[1]}",
            flush=True,
        )
        await server.serve_forever()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:  # pragma: no cover - uvloop is in the project's venv
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
