"""The OpenAI surface of a fabric started with `tierflow up`, through the official client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tierflow.tokenizer import count_tokens, encode, render_chat

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three prime numbers."}]


@pytest.fixture(scope="module")
def client(fabric) -> openai.OpenAI:
    return openai.OpenAI(base_url=fabric.base_url, api_key="test-key", max_retries=0, timeout=30)


def _prompt_tokens(messages: list[dict[str, str]]) -> int:
    return len(encode(render_chat([(m["role"], m["content"]) for m in messages])))


def _post_raw(fabric, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{fabric.host}:{fabric.http_port}{path}", data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_lists_the_deployed_models(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["gpt-oss-20b", "llama-3.1-8b"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_has_text_and_exact_usage(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, seed=7)
    text = resp.choices[0].message.content
    assert text and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens == _prompt_tokens(MESSAGES)
    assert resp.usage.completion_tokens == count_tokens(text) <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == MODEL and resp.id.startswith("chatcmpl-")


def test_streamed_chat_matches_unstreamed_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32, seed=11)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32, seed=11, stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        assert chunk.system_fingerprint == whole.system_fingerprint  # on every chunk, as OpenAI's
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_ignore_eos_generates_exactly_max_tokens(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="gpt-oss-20b", messages=MESSAGES, max_tokens=40, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 40 and resp.choices[0].finish_reason == "length"


def test_text_completion_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, seed=3)
    assert whole.usage.prompt_tokens == len(encode("Once upon a time"))
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, seed=3, stream=True) if c.choices)
    assert streamed == whole.choices[0].text != ""


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    body = err.value.body
    assert err.value.status_code == 404
    assert body["code"] == "model_not_found" and body["param"] == "model" and "no-such-model" in body["message"]


def test_stream_options_without_stream_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream_options={"include_usage": True})
    assert err.value.body["param"] == "stream_options"


def test_over_context_is_400_with_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    assert err.value.body["code"] == "context_length_exceeded" and "8192" in err.value.body["message"]


def test_request_class_above_the_tenants_is_403_and_flex_runs_as_batch(fabric, client: openai.OpenAI) -> None:
    """Issue 21, on the open tenant (default class standard, nothing higher)."""
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, service_tier="priority")
    assert denied.value.status_code == 403 and denied.value.body["code"] == "request_class_not_allowed"
    assert "'interactive'" in denied.value.message and "'standard'" in denied.value.message
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=2, service_tier="flex")
    assert fabric.request_record(raw.headers["x-request-id"])["request_class"] == "batch"


def test_malformed_json_is_400(fabric) -> None:
    status, body = _post_raw(fabric, "/v1/chat/completions", b'{"model": "llama-3.1-8b", "messages": [')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]


def test_missing_messages_is_400_naming_the_field(fabric) -> None:
    status, body = _post_raw(fabric, "/v1/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400
    assert body["error"]["param"] == "messages" and "messages" in body["error"]["message"]


def test_wrong_type_names_the_path(fabric) -> None:
    status, body = _post_raw(fabric, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode())
    assert status == 400 and body["error"]["param"] == "messages[0].content"


def test_health_reports_nodes_and_models(fabric) -> None:
    with urllib.request.urlopen(f"http://{fabric.host}:{fabric.http_port}/health", timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "ok" and body["nodes"] == 2 and body["models"] == 2
