"""What agent frameworks ask of the OpenAI surface (issue 20), through the official client
and a real fabric: tool calls whose arguments validate against the tool's schema, content
that validates against response_format, stop strings applied, logprobs, n choices;
streamed and not. Parameters the fabric cannot honour are a 400 naming them."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from tierflow.tokenizer.pieces import encode_pieces

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
ASK = [{"role": "user", "content": "What is the weather in Paris? Then book a table."}]
WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["location", "unit"], "additionalProperties": False,
}
BOOKING = {
    "$defs": {"Guest": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}}, "required": ["name"]}},
    "type": "object",
    "properties": {"when": {"type": "string", "format": "date-time"}, "guests": {"type": "array", "items": {"$ref": "#/$defs/Guest"}, "minItems": 1, "maxItems": 4},
                   "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["when", "guests"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_table", "parameters": BOOKING}}]
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING}


@pytest.fixture(scope="module")
def client(fabric) -> openai.OpenAI:
    return openai.OpenAI(base_url=fabric.base_url, api_key="test-key", max_retries=0, timeout=30)


def test_tools_give_a_tool_call_whose_arguments_validate(client: openai.OpenAI) -> None:
    names = set()
    for seed in range(4):
        resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, seed=seed, max_tokens=400)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert resp.usage.completion_tokens == len(encode_pieces(call.function.arguments))  # exactly what was produced
        names.add(call.function.name)
    again = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, seed=3, max_tokens=400)
    assert again.choices[0].message.tool_calls[0].function.arguments == call.function.arguments  # same seed, same call
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "book_table"}}, seed=1)
    assert named.choices[0].message.tool_calls[0].function.name == "book_table"
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", seed=1, max_tokens=8)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_auto_answers_a_tool_result_in_text(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, seed=2)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, seed=2, max_tokens=16)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_streamed_tool_call_through_the_client_stream_helper(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, seed=5, max_tokens=400)
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, seed=5, max_tokens=400, stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call, expected = final.choices[0].message.tool_calls[0], whole.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (expected.id, expected.function.name, expected.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls" and final.usage.completion_tokens == whole.usage.completion_tokens
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_response_format_json_schema_and_json_object(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "booking", "schema": BOOKING, "strict": True}}
    resp = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, seed=9, max_tokens=400)
    jsonschema.validate(json.loads(resp.choices[0].message.content), BOOKING)
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, seed=9, max_tokens=400, stream=True) if c.choices)
    assert streamed == resp.choices[0].message.content
    obj = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"}, seed=4)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    cut = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, seed=9, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


def test_stop_strings_are_applied_streamed_and_not(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, seed=3, extra_body={"ignore_eos": True}).choices[0].text
    stop = " ".join(free.split(" ")[6:8])
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, seed=3, stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].text == free[: free.index(stop)] and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < 40
    chat_free = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30, seed=8, extra_body={"ignore_eos": True}).choices[0].message.content
    chat_stop = chat_free.split(" ")[5]
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30, seed=8, stop=chat_stop, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    text = "".join(pieces)
    assert chat_stop not in text and text == chat_free[: chat_free.index(chat_stop)] and finish == "stop"


def test_logprobs_and_n_choices(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, seed=1, n=3, logprobs=True, top_logprobs=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 3
    assert resp.usage.completion_tokens == sum(len(c.logprobs.content) for c in resp.choices)
    for c in resp.choices:
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        for t in c.logprobs.content:
            assert t.logprob < 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
            assert all(a.logprob <= t.logprob for a in t.top_logprobs)
    streamed: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, seed=1, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index].append(c.delta.content or "")
    assert ["".join(v) for _, v in sorted(streamed.items())] == [c.message.content for c in resp.choices]
    legacy = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, seed=2, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.token_logprobs) == legacy.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs)


@pytest.mark.parametrize(("extra", "param"), [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, "messages[0].content[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^A"}}}}}]},
     "tools[0].function.parameters.properties.code.pattern"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"modalities": ["text", "audio"]}, "modalities"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(client: openai.OpenAI, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": ASK, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert err.value.body["param"] == param


def test_over_grpc_tools_schema_and_stop(fabric) -> None:
    import grpc
    from tierflow.v1 import inference_pb2 as pb
    from tierflow.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"{fabric.host}:{fabric.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Weather in Paris?")])
        req = pb.GenerateRequest(model=MODEL, messages=chat, max_tokens=400, seed=4, tools_json=json.dumps(TOOLS), tool_choice_json='"required"')
        unary = stub.GenerateUnary(req, timeout=30)
        assert unary.finish_reason == "tool_calls" and unary.tool_call.id.startswith("call_")
        jsonschema.validate(json.loads(unary.tool_call.arguments), SCHEMAS[unary.tool_call.name])
        chunks = list(stub.Generate(req, timeout=30))
        assert "".join(c.text for c in chunks) == unary.tool_call.arguments
        assert chunks[-1].tool_call.arguments == unary.tool_call.arguments and chunks[-1].finish_reason == "tool_calls"
        fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "b", "schema": BOOKING}})
        content = stub.GenerateUnary(pb.GenerateRequest(model=MODEL, messages=chat, max_tokens=400, seed=4, response_format_json=fmt), timeout=30)
        jsonschema.validate(json.loads(content.text), BOOKING)
        free = stub.GenerateUnary(pb.GenerateRequest(model=MODEL, prompt="Once", max_tokens=30, seed=6, ignore_eos=True), timeout=30).text
        stop = free.split(" ")[4]
        cut = stub.GenerateUnary(pb.GenerateRequest(model=MODEL, prompt="Once", max_tokens=30, seed=6, ignore_eos=True, stop=[stop]), timeout=30)
        assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"
        with pytest.raises(grpc.RpcError) as err:
            stub.GenerateUnary(pb.GenerateRequest(model=MODEL, prompt="x", tools_json="[{]"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools_json" in err.value.details()
