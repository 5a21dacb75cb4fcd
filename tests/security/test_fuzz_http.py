"""The OpenAI HTTP API under hostile input: schemathesis over the router's own
`/openapi.json`, and a hand-made battery of bodies that once found 500s.

Every answer must be below 500 (a 504 only where the request set its own deadline) and,
for schemathesis' cases, conform to the document: a status it lists, a content type it
lists, a body matching its schema (so the document and the handlers cannot drift apart).
Two thirds of the generated bodies name a real model with a small `max_tokens` (half of
those streamed), so they travel the whole path to the node instead of stopping at a 404,
and the SSE events are checked against the document's chunk schemas too.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from tierflow.harness import Fabric
from tierflow.services.router.openapi import PATHS

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
GENERATION = ("/v1/chat/completions", "/v1/completions")
EXAMPLES = 150  # ~7 s on 2 cores (the embeddings and rerank paths share the draw since issue 20)


def _url(fabric: Fabric, path: str) -> str:
    return f"http://{fabric.host}:{fabric.http_port}{path}"


def _post(fabric: Fabric, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(_url(fabric, path), data=body, method="POST", headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _assert_openai_error(status: int, body: Any, expected: int = 400) -> dict[str, Any]:
    assert status == expected, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error  # type: ignore[no-any-return]


def test_the_document_is_served_and_covers_every_route(fabric: Fabric) -> None:
    with urllib.request.urlopen(_url(fabric, "/openapi.json"), timeout=5) as response:
        document = json.loads(response.read())
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == set(PATHS)
    assert {"ChatCompletionRequest", "CompletionRequest", "ErrorResponse"} <= set(document["components"]["schemas"])


def _deep(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a":' * depth + inner + b"}" * depth


_CHAT = b'{"model":"llama-3.1-8b","messages":[{"role":"user","content":"hi"}],"max_tokens":2'
_COMPLETION = b'{"model":"llama-3.1-8b","max_tokens":2,"prompt":'

HOSTILE: list[tuple[str, bytes, str | None]] = [
    # The two 500s of the battery: token ids outside the vocabulary, nesting.
    ("/v1/completions", _COMPLETION + b"[1,2,131072]}", "prompt[2]"),
    ("/v1/completions", _COMPLETION + b"[18446744073709551616]}", "prompt[0]"),
    ("/v1/completions", _COMPLETION + b"[-1]}", "prompt[0]"),
    ("/v1/chat/completions", _CHAT + b',"unknown":' + _deep(100_000) + b"}", None),
    ("/v1/chat/completions", _CHAT + b',"unknown":' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    ("/v1/completions", _COMPLETION + b'"x","unknown":' + _deep(2000) + b"}", None),
    ("/v1/chat/completions", _CHAT + b',"tools":[{"type":"function","function":{"name":"f","parameters":' + _deep(40) + b"}}]}", "tools[0].function.parameters"),
    # Every field bounded.
    ("/v1/chat/completions", b'{"model":"llama-3.1-8b","messages":[' + b",".join([b'{"role":"user","content":"x"}'] * 4097) + b"]}", "messages"),
    ("/v1/chat/completions", _CHAT + b',"stop":[' + b",".join([b'"s"'] * 17) + b"]}", "stop"),
    ("/v1/chat/completions", _CHAT + b',"stop":"' + b"s" * 513 + b'"}', "stop"),
    ("/v1/chat/completions", _CHAT + b',"n":17}', "n"),  # n > MAX_CHOICES (16)
    ("/v1/chat/completions", _CHAT + b',"seed":99999999999999999999}', "seed"),
    ("/v1/chat/completions", _CHAT + b',"logit_bias":{' + b",".join(b'"%d":1' % i for i in range(301)) + b"}}", "logit_bias"),
    ("/v1/chat/completions", _CHAT + b',"logit_bias":{"5":1000}}', "logit_bias[...]"),
    ("/v1/chat/completions", _CHAT + b',"tools":[' + b",".join([b'{"type":"function","function":{"name":"f"}}'] * 129) + b"]}", "tools"),
    ("/v1/chat/completions", b'{"model":"' + b"m" * 300 + b'","messages":[{"role":"user","content":"x"}]}', "model"),
    ("/v1/chat/completions", _CHAT + b',"max_tokens":99999999999}', "max_tokens"),
    ("/v1/chat/completions", _CHAT + b',"user":"' + b"u" * 600 + b'"}', "user"),
    ("/v1/completions", _COMPLETION + b"[" + b",".join([b"1"] * ((1 << 20) + 1)) + b"]}", "prompt"),
    # Shapes.
    ("/v1/chat/completions", b"", None),
    ("/v1/chat/completions", b"[]", None),
    ("/v1/chat/completions", b"null", None),
    ("/v1/chat/completions", b'"\xff\xfe"', None),
    ("/v1/chat/completions", b'{"model":1}', "model"),
    ("/v1/chat/completions", b"{" * 10, None),
    ("/v1/completions", _COMPLETION + b'["a","b"]}', "prompt"),
    ("/v1/completions", _COMPLETION + b'[1,"a"]}', "prompt"),
    ("/v1/chat/completions", _CHAT + b',"stream_options":{"include_usage":true}}', "stream_options"),
]


@pytest.mark.parametrize(("path", "body", "param"), HOSTILE, ids=[f"{i}-{p.rsplit('/', 1)[1]}" for i, (p, _, _) in enumerate(HOSTILE)])
def test_hostile_bodies_are_400s_in_openai_shape(fabric: Fabric, path: str, body: bytes, param: str | None) -> None:
    status, answer = _post(fabric, path, body)
    error = _assert_openai_error(status, answer)
    if param is not None:
        assert error["param"] == param, error


def test_a_body_over_the_limit_is_a_413_not_a_dropped_connection(fabric: Fabric) -> None:
    with socket.create_connection((fabric.host, fabric.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 9000000\r\n\r\n")
        answer = sock.recv(65536)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413")
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["message"]


def test_the_fabric_still_serves_after_the_battery(fabric: Fabric) -> None:
    status, answer = _post(fabric, "/v1/chat/completions", _CHAT + b"}")
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"


@pytest.fixture(scope="module")
def schema(fabric: Fabric) -> Any:
    return schemathesis.openapi.from_url(_url(fabric, "/openapi.json"))


def _realistic(case: Any, stream: bool) -> None:
    """Point a generated generation body at a real model with a small budget (streamed,
    with usage, when `stream`: the SSE events are checked against the document too)."""
    body = case.body
    headers = case.headers or {}
    for name, valid in (("x-tierflow-workload", ("interactive", "batch")), ("x-tierflow-class", ("standard", "batch"))):
        if name in headers and headers[name] not in valid:
            del headers[name]  # a made-up value is a 400 naming the choices: the "as generated" mode covers that
    if case.path in GENERATION and isinstance(body, dict):
        body["model"] = MODEL
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int):
                body[field] = max(1, min(body[field], 8))
        body.setdefault("max_tokens", 8)
        for field in ("logit_bias", "presence_penalty", "frequency_penalty", "suffix", "best_of"):
            body.pop(field, None)  # refused by design (a 400 naming them), not what this mode is for
        if isinstance(body.get("n"), int):
            body["n"] = min(body["n"], 2)
        if body.get("service_tier") not in (None, "auto", "default", "flex", "standard", "batch"):
            body.pop("service_tier")  # a made-up class is a 400 naming the choices, and the open tenant may not ask above standard
        if stream:
            body["stream"], body["stream_options"] = True, {"include_usage": True}


def test_schemathesis_finds_no_server_error_and_every_answer_conforms(fabric: Fabric, schema: Any) -> None:
    session = requests.Session()
    seen: dict[int, int] = {}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    anything = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    # Streamed runs draw valid generation bodies only: drawn from every operation, how many
    # of them reached a stream depended on the schema's shape (one field more, one stream).
    generation = schema.include(path=list(GENERATION)).as_strategy(GenerationMode.POSITIVE)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(drawn=st.one_of(st.tuples(anything, st.sampled_from(("as generated", "real model"))),
                           st.tuples(generation, st.just("real model, streamed"))))
    def run(drawn: tuple[Any, str]) -> None:
        case, mode = drawn
        if mode != "as generated":
            _realistic(case, stream=mode.endswith("streamed"))
        timeout = (case.headers or {}).get("x-tierflow-timeout")
        try:
            response = case.call(base_url=_url(fabric, ""), session=session, timeout=20)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeEncodeError):
            return  # the client library would not send it: nothing reached the router
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code == 200 and "event-stream" in " ".join(response.headers.get("content-type") or ()):
            seen[0] = seen.get(0, 0) + 1  # streams answered (key 0)
        if response.status_code == 504 and timeout is not None:
            return  # the one 5xx by design: the deadline the request set itself
        case.validate_response(response, checks=checks)

    run()
    assert seen.get(0, 0) >= 3 and seen.get(200, 0) >= 10 and any(400 <= s < 500 for s in seen), seen
