"""A streamed chat completion's server-sent events, decoded with msgspec.

Why not the openai client's own stream: it builds a pydantic model per chunk
(`openai._models.construct_type`), ~86 µs of CPU per token against ~10 µs here
(`loadtest/stream_decode.py`). Replaying a production trace at ten times its speed (~50
requests/s of ~180 tokens each) spent most of a core there, so the client fell seconds
behind the trace at its peaks and measured itself, not the fabric. The request still goes through the official client (auth, headers, status
errors, transport); only the body's events are decoded here, into the few fields the
driver reads.

The event format is the one OpenAI-compatible servers send: `data: {json}` lines, events
separated by a blank line, `data: [DONE]` at the end, `:` comment lines; an `error` object
in place of a chunk is a failure after the 200 (the fabric's node died mid-stream).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

import msgspec

__all__ = ["DONE", "ChatChunk", "SseEvents", "StreamError", "Usage", "decode_chunk", "read_chunks"]

DONE: Final = b"[DONE]"


class Delta(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    delta: Delta = msgspec.field(default_factory=Delta)


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorBody(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class ChatChunk(msgspec.Struct):
    """The fields of a `chat.completion.chunk` the driver reads (the rest are skipped unparsed)."""

    choices: list[Choice] = []
    usage: Usage | None = None
    error: ErrorBody | None = None


class StreamError(Exception):
    """The stream carried an error event, or something that is not a chunk."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_chunk_decoder: Final = msgspec.json.Decoder(ChatChunk)


def decode_chunk(data: bytes) -> ChatChunk:
    """One event's data as a chunk; StreamError if it is an error event or malformed."""
    try:
        chunk = _chunk_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise StreamError("bad_stream", f"an event is not a chat completion chunk ({exc}): {data[:200]!r}") from None
    if chunk.error is not None:
        error = chunk.error
        raise StreamError(str(error.code or error.type or "stream_error"), error.message or "an error event in the stream")
    return chunk


class SseEvents:
    """Splits a byte stream into events' data, however the bytes are chunked on the wire.

    Lines end in LF or CRLF; a line `data: X` (the space is optional) adds X to the
    event, several data lines join with LF, a blank line ends the event, other fields and
    comments are skipped.
    """

    __slots__ = ("_data", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event `chunk` completes, in order."""
        lines = (self._partial + chunk).split(b"\n") if self._partial else chunk.split(b"\n")
        self._partial = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(self._data[0] if len(self._data) == 1 else b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        return events


async def read_chunks(body: AsyncIterable[bytes]) -> AsyncIterator[ChatChunk]:
    """The chunks of a streamed body, however its bytes arrive; StreamError as `decode_chunk`.

    Reads to the end of the body even after `[DONE]`, so the connection is reused.
    """
    events = SseEvents()
    done = False
    async for data in body:
        for event in events.feed(data):
            if done or event == DONE:
                done = True
                continue
            yield decode_chunk(event)
