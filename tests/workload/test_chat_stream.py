"""The load generator's SSE decoding: every way the wire may cut the bytes gives the same events."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierflow.workload.chat_stream import DONE, SseEvents, StreamError, decode_chunk

BODY = (
    b": keep-alive comment\n\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data:{"choices":[{"index":0,"delta":{"content":" ba"}}]}\r\n\r\n'
    b"event: ignored\n"
    b'data: {"choices":[{"index":0,\n'
    b'data: "delta":{"content":" x\\ny"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":4}}}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [
    b'{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
    b'{"choices":[{"index":0,"delta":{"content":" ba"}}]}',
    b'{"choices":[{"index":0,\n"delta":{"content":" x\\ny"}}]}',
    b'{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":4}}}',
    DONE,
]


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in zip(points, points[1:])]


@given(st.lists(st.integers(min_value=0), max_size=40))
def test_events_do_not_depend_on_how_the_bytes_are_cut(cuts: list[int]) -> None:
    events = SseEvents()
    assert [e for piece in _split(BODY, cuts) for e in events.feed(piece)] == EXPECTED


def test_chunks_decode_to_what_the_driver_reads() -> None:
    first, second, third, usage = (decode_chunk(e) for e in EXPECTED[:4])
    assert first.choices[0].delta.content == "" and second.choices[0].delta.content == " ba"
    assert third.choices[0].delta.content == " x\ny"
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (9, 2)
    assert usage.usage.prompt_tokens_details is not None and usage.usage.prompt_tokens_details.cached_tokens == 4


def test_an_error_event_or_a_stranger_is_a_stream_error() -> None:
    error = json.dumps({"error": {"message": "node lost", "type": "node_failure", "param": None, "code": "node_lost"}}).encode()
    with pytest.raises(StreamError, match="node lost") as raised:
        decode_chunk(error)
    assert raised.value.code == "node_lost"
    with pytest.raises(StreamError) as raised:
        decode_chunk(b"<html>proxy error</html>")
    assert raised.value.code == "bad_stream" and "proxy error" in str(raised.value)
