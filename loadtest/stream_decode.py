"""What the load generator spends per streamed token: the openai client's chunk models
against `tierflow.workload.chat_stream`, on the same stream in the same run.

A child process serves a chat completion stream of TOKENS chunks (the router's own HTTP
server, the chunks the router writes); this process reads it REQUESTS times each way
through the official `openai` client, alternating rounds so machine noise hits both alike,
and prints the CPU time of this process per token for each, their ratio and difference:

  openai   `async for chunk in stream` (a pydantic model per chunk, what the driver did)
  msgspec  `with_streaming_response` + `chat_stream.read_chunks` (what the driver does)

    .venv/bin/python loadtest/stream_decode.py [--requests 40] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections.abc import AsyncIterator

import openai

from tierflow.runtime.nats_server import free_port
from tierflow.services.router.http_server import Request, StreamingResponse, serve
from tierflow.workload.chat_stream import read_chunks


def _frame(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _serve(port: int, tokens: int) -> None:
    chunk = _frame({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": " ba"}, "finish_reason": None}]})  # fmt: skip
    usage = _frame({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
                    "usage": {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}})  # fmt: skip

    async def events() -> AsyncIterator[bytes]:
        for _ in range(tokens):
            yield chunk
        yield usage
        yield b"data: [DONE]\n\n"

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, events())

    async def main() -> None:
        await serve(handler, "127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _with_openai(client: openai.AsyncOpenAI) -> int:
    seen = 0
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    async for chunk in stream:
        seen += sum(1 for c in chunk.choices if c.delta.content)
    return seen


async def _with_msgspec(client: openai.AsyncOpenAI) -> int:
    seen = 0
    async with client.chat.completions.with_streaming_response.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True) as response:
        async for chunk in read_chunks(response.iter_bytes()):
            seen += sum(1 for c in chunk.choices if c.delta.content)
    return seen


async def _measure(port: int, requests: int, tokens: int) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    ways = {"openai": _with_openai, "msgspec": _with_msgspec}
    cpu = dict.fromkeys(ways, 0.0)
    for way in ways.values():  # warm both paths (imports, connection) outside the timing
        assert await way(client) == tokens
    for _ in range(requests):
        for name, way in ways.items():
            start = time.process_time()
            assert await way(client) == tokens
            cpu[name] += time.process_time() - start
    await client.close()
    return {name: seconds / (requests * tokens) for name, seconds in cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    port = free_port()
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(port, args.tokens), daemon=True)
    server.start()
    try:
        time.sleep(0.5)  # the child binds its port
        per_token = asyncio.run(_measure(port, args.requests, args.tokens))
    finally:
        server.terminate()
    print(f"{args.requests} streams of {args.tokens} tokens each way; this process's CPU per token:")
    for name, seconds in per_token.items():
        print(f"  {name:8s} {seconds * 1e6:7.1f} µs")
    print(f"  openai / msgspec: {per_token['openai'] / per_token['msgspec']:.1f}x, "
          f"difference {(per_token['openai'] - per_token['msgspec']) * 1e6:.1f} µs per token")  # fmt: skip


if __name__ == "__main__":
    main()
