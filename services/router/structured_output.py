"""What a chat answer must be, decided by the router before the node runs: free text, a
tool call, or JSON a schema asks for, and the log-probabilities clients may ask for.

Structured answers are planned here, from the request's seed (`plan`): the router picks
the tool, generates arguments or content that validate against the schema
(`tierflow.rdu.structured`), and sends their token ids to the node
(`GenerateRequest.output_token_ids`), which streams them with its usual timing and ends
with them (finish_reason `stop`, shown as `tool_calls` for a call) or at max_tokens
(`length`, the JSON cut short, as OpenAI does). Usage counts exactly those tokens.

The tool rule (`tool_choice`): "none", or no tools: text. "required": a call to a tool
drawn from the seed; a named function: a call to it. "auto" (the default with tools): a
call, to a tool drawn from the seed, unless the last message is a tool result (role
`tool` or `function`), which the model then answers in text: an agent loop's call ->
result -> answer, deterministic for a seed.

Log-probabilities are made up as deterministically (a hash of seed, position and
token): well-formed, the chosen token the most likely, the alternatives other words of
the output vocabulary with lower values.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, Literal

import msgspec
from tierflow.rdu.structured import (
    Unsatisfiable,
    rng_for,
    structured_tokens,
    unsupported,
)
from tierflow.runtime.errors import InvalidRequest
from tierflow.services.router.openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    check_limits,
    check_supported,
)
from tierflow.tokenizer import OUTPUT_VOCAB, decode_output

__all__ = [
    "OutputPlan",
    "call_id",
    "chat_logprobs",
    "check_schemas",
    "completion_logprobs",
    "grpc_plan",
    "plan",
]

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(slots=True)
class OutputPlan:
    kind: str = "text"  # "text" | "json" | "tool"
    tool: str = ""  # the function called (kind "tool")
    call_id: str = ""
    token_ids: list[int] = field(default_factory=list)


def check_schemas(body: ChatCompletionRequest) -> None:
    """A 400 naming the first schema keyword no answer could be generated for."""
    for i, tool in enumerate(body.tools or ()):
        where = unsupported(tool.function.parameters or {}, f"tools[{i}].function.parameters")
        if where is not None:
            raise InvalidRequest(f"{where} is not supported by the fabric's structured output (supported: see the README)", param=where)
    fmt = body.response_format
    if fmt is not None and fmt.json_schema is not None and fmt.type == "json_schema":
        where = unsupported(fmt.json_schema.schema or {}, "response_format.json_schema.schema")
        if where is not None:
            raise InvalidRequest(f"{where} is not supported by the fabric's structured output (supported: see the README)", param=where)


def _calls_tool(body: ChatCompletionRequest) -> bool:
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return False
    if choice == "required" or isinstance(choice, NamedToolChoice):
        return True
    return body.messages[-1].role not in ("tool", "function")  # "auto"


def plan(body: ChatCompletionRequest, seed: int, index: int) -> OutputPlan:
    """The answer of choice `index` (its seed: the request's + index)."""
    choice_seed = seed + index
    if _calls_tool(body):
        tools = body.tools or []
        choice = body.tool_choice
        if isinstance(choice, NamedToolChoice):
            tool = next(t for t in tools if t.function.name == choice.function.name)
        else:
            tool = tools[rng_for(choice_seed, "tool").randrange(len(tools))]
        name = tool.function.name
        schema = tool.function.parameters if tool.function.parameters is not None else _EMPTY_PARAMETERS
        return OutputPlan("tool", name, call_id(choice_seed, name), _tokens(schema, choice_seed, "tool:" + name, f"tools[{tools.index(tool)}].function.parameters"))
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return OutputPlan()
    if fmt.type == "json_object":
        return OutputPlan("json", token_ids=_tokens({"type": "object"}, choice_seed, "json", "response_format"))
    schema = fmt.json_schema.schema if fmt.json_schema is not None else None
    return OutputPlan("json", token_ids=_tokens(schema or {}, choice_seed, "schema", "response_format.json_schema.schema"))


def _tokens(schema: Any, seed: int, purpose: str, param: str) -> list[int]:
    try:
        _, ids = structured_tokens(schema, rng_for(seed, purpose))
    except Unsatisfiable as exc:
        raise InvalidRequest(f"{param}: no value satisfies the schema: {exc}", param=param) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a malformed schema (e.g. "minimum": "x")
        raise InvalidRequest(f"{param}: the schema is malformed: {exc}", param=param) from None
    return ids


def call_id(seed: int, name: str) -> str:
    h = blake2b(f"{seed}\0{name}".encode(), digest_size=12)
    return "call_" + h.hexdigest()


# ------------------------------------------------------------------ log-probabilities

def _logprob(seed: int, position: int, token_id: int) -> float:
    h = zlib.crc32(f"{seed}:{position}:{token_id}".encode())
    return -round((h % 2500) / 1000 + 0.0005, 4)  # in (-2.5, 0)


def _alternatives(seed: int, position: int, token_id: int, chosen: float, n: int) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    size = len(OUTPUT_VOCAB)
    h = zlib.crc32(f"alt:{seed}:{position}".encode())
    step = 1
    while len(out) < n:
        alt = (h + 7919 * step) % size
        step += 1
        if alt == token_id:
            continue
        out.append((OUTPUT_VOCAB[alt], round(chosen - 0.75 * len(out) - 0.5 - (h % 97) / 1000, 4)))
    return out


def _entry(text: str, lp: float) -> dict[str, Any]:
    return {"token": text, "logprob": lp, "bytes": list(text.encode())}


def chat_logprobs(token_ids: list[int], start: int, seed: int, top: int) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` entries of the tokens at positions start.. of a completion."""
    content = []
    for k, tid in enumerate(token_ids):
        pos = start + k
        text = decode_output([tid])
        lp = _logprob(seed, pos, tid)
        entry = _entry(text, lp)
        entry["top_logprobs"] = [_entry(text, lp)] + [_entry(t, v) for t, v in _alternatives(seed, pos, tid, lp, top - 1)] if top else []
        content.append(entry)
    return content


def completion_logprobs(token_ids: list[int], start: int, offset: int, seed: int, top: int) -> dict[str, Any]:
    """A legacy completion's `logprobs` object for the tokens at positions start.., the
    first at text offset `offset`."""
    tokens, values, tops, offsets = [], [], [], []
    for k, tid in enumerate(token_ids):
        pos = start + k
        text = decode_output([tid])
        lp = _logprob(seed, pos, tid)
        tokens.append(text)
        values.append(lp)
        tops.append({text: lp, **dict(_alternatives(seed, pos, tid, lp, top - 1))} if top else {})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}



_GRPC_FIELDS: dict[str, Any] = {
    "tools": list[Tool],
    "tool_choice": Literal["none", "auto", "required"] | NamedToolChoice,
    "response_format": ResponseFormat,
}
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def grpc_plan(request: Any, params: Any) -> OutputPlan:
    """The gRPC twin of `plan`: the request's `tools_json`, `tool_choice_json` and
    `response_format_json` read as the OpenAI fields of the same names (and checked the
    same way); `params` (GenerateParams) gets the seed, drawn when not given, and the
    planned tokens."""
    if not (request.tools_json or request.response_format_json):
        return OutputPlan()
    fields: dict[str, Any] = {}
    for name, kind in _GRPC_FIELDS.items():
        raw = getattr(request, f"{name}_json")
        if raw:
            try:
                fields[name] = msgspec.json.decode(raw, type=kind)
            except (msgspec.MsgspecError, RecursionError) as exc:
                raise InvalidRequest(f"{name}_json is not a valid OpenAI `{name}`: {exc}", param=f"{name}_json") from None
    chat = request.messages.messages if request.WhichOneof("input") == "messages" else ()
    last_role = chat[-1].role if chat and chat[-1].role in _ROLES else "user"
    body = ChatCompletionRequest(model=params.model, messages=[ChatMessage(role=last_role)], **fields)
    problem = check_limits(body) or check_supported(body)
    if problem is not None:
        raise InvalidRequest(problem[1], param=problem[0] + "_json" if problem[0] in _GRPC_FIELDS else problem[0])
    check_schemas(body)
    if params.seed is None:
        params.seed = random.getrandbits(31)
    out = plan(body, params.seed, 0)
    params.output_token_ids = out.token_ids
    return out
