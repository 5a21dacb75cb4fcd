"""The OpenAI request bodies the router accepts, as msgspec Structs, and their limits.

Unknown fields are ignored (clients send many we do not use), types are checked on
decode, and msgspec's error names the path (`at $.messages[0].content`), which becomes
the `param` of the 400 answer.

Every field is bounded, so no well-formed body can make the router do unbounded work or
hold unbounded memory beyond what the body itself took (`max_body_bytes`, 8 MiB): the
limits below are checked by msgspec while decoding (`Meta`), and the few it cannot
express (the nesting of free-form JSON such as a tool's
`parameters`) by `check_limits` right after. A body nested deeper than msgspec's own
recursion guard anywhere, unknown fields included, is a `RecursionError` the API turns
into a 400 as well. These same Structs are what `/openapi.json` describes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from tierflow.tokenizer import VOCAB_SIZE

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "chat_decoder",
    "completion_decoder",
    "ContentPart",
    "ChatMessage",
    "Tool",
    "LIMITS",
    "check_limits",
    "check_supported",
    "ResponseFormat",
    "NamedToolChoice",
]

# One place for every bound (README "Hostile input" lists them).
MAX_TEXT_CHARS = 8 << 20  # a prompt or message: no more than the body limit anyway
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 1024  # parts of one message's content
MAX_STOP = 16  # stop sequences (OpenAI allows 4; vLLM any number)
MAX_STOP_CHARS = 512  # each: the node matches them against every generated token
MAX_PROMPT_IDS = 1 << 20  # a token-id prompt; more than any model's context
MAX_NAME_CHARS = 256  # model, message name, tool name, content part type
MAX_USER_CHARS = 512  # `user`: also a session key
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION_CHARS = 1 << 16
MAX_LOGIT_BIAS = 300
MAX_TOKENS = 1 << 24  # above any context; the model's own limit is checked per request
MAX_JSON_DEPTH = 32  # free-form JSON (a tool's `parameters`) may nest this deep
MAX_CHOICES = 16  # `n`: each choice is a generation of its own
MAX_TOP_LOGPROBS = 20  # vLLM's and OpenAI's chat limit
LIMITS: dict[str, int] = {
    "messages": MAX_MESSAGES, "content_parts": MAX_CONTENT_PARTS, "text_chars": MAX_TEXT_CHARS,
    "stop": MAX_STOP, "stop_chars": MAX_STOP_CHARS, "prompt_token_ids": MAX_PROMPT_IDS,
    "name_chars": MAX_NAME_CHARS, "user_chars": MAX_USER_CHARS, "tools": MAX_TOOLS,
    "logit_bias": MAX_LOGIT_BIAS, "max_tokens": MAX_TOKENS, "json_depth": MAX_JSON_DEPTH,
    "n": MAX_CHOICES, "top_logprobs": MAX_TOP_LOGPROBS,
}

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
Int64 = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
StopText = Annotated[str, Meta(max_length=MAX_STOP_CHARS)]
# A token id of the fabric's tokenizer (an id outside it once reached the node as a 500).
TokenId = Annotated[int, Meta(ge=0, lt=VOCAB_SIZE)]


class StreamOptions(Struct):
    include_usage: bool = False


class ContentPart(Struct):
    """Only text parts are served: any other type (image_url, input_audio, file) is a 400
    naming it (`check_supported`), never silently left out of the prompt."""

    type: Name
    text: Text = ""


class FunctionCall(Struct):
    name: Name
    arguments: Text = ""


class ToolCall(Struct):
    """A tool call of an earlier assistant turn (agent history)."""

    function: FunctionCall
    id: Name = ""
    type: Literal["function"] = "function"


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Annotated[list[ContentPart], Meta(max_length=MAX_CONTENT_PARTS)] | None = None
    name: Name | None = None
    tool_calls: Annotated[list[ToolCall], Meta(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Name | None = None

    def text(self) -> str:
        """What the prompt holds of this message: its text, then its tool calls."""
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(p.text for p in self.content if p.type == "text")
        if self.tool_calls:
            text += "".join(f"<tool_call>{c.function.name}({c.function.arguments})</tool_call>" for c in self.tool_calls)
        return text


class FunctionDefinition(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    description: Annotated[str, Meta(max_length=MAX_TOOL_DESCRIPTION_CHARS)] = ""
    parameters: dict[str, Any] | None = None  # a JSON Schema: free-form, so depth-checked
    strict: bool | None = None


class Tool(Struct):
    """A function the model may call: the emulator answers with a call whose arguments
    validate against `parameters` (see services/router/structured_output.py)."""

    function: FunctionDefinition
    type: Literal["function"] = "function"


class _Sampling(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Meta(max_length=MAX_STOP)] | None = None
    seed: Int64 | None = None
    user: Annotated[str, Meta(max_length=MAX_USER_CHARS)] | None = None
    # OpenAI's tier, or a tierflow class name: which class the request runs in
    # (tierflow.placement.classes; the `x-tierflow-class` header says the same).
    service_tier: Annotated[str, Meta(max_length=32)] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks, replay)
    # Bounded, and refused unless they ask for nothing (`check_supported`): the emulator's
    # sampling has no logits to bias or penalise, and a parameter is never silently dropped.
    logit_bias: Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]], Meta(max_length=MAX_LOGIT_BIAS)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None


class NamedFunction(Struct):
    name: Name


class NamedToolChoice(Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class JsonSchemaFormat(Struct):
    name: Annotated[str, Meta(max_length=MAX_NAME_CHARS)] = "response"
    schema: dict[str, Any] | None = None  # free-form, so depth-checked
    description: Annotated[str, Meta(max_length=MAX_TOOL_DESCRIPTION_CHARS)] = ""
    strict: bool | None = None


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: PositiveInt | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # one call per answer either way
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Read only to refuse (`check_supported`): the legacy form of tools, and output other
    # than text. (store, metadata, reasoning_effort, prediction change nothing
    # a client reads back here, so they are accepted and ignored like any unknown field.)
    functions: Any = None
    function_call: Any = None
    modalities: Annotated[list[Annotated[str, Meta(max_length=16)]], Meta(max_length=4)] | None = None
    audio: Any = None


class CompletionRequest(_Sampling, kw_only=True):
    # A string, a one-string list, or token ids (checked in `prompt_input`: msgspec
    # unions may hold only one array type).
    prompt: Text | Annotated[list[Text | TokenId], Meta(min_length=1, max_length=MAX_PROMPT_IDS)]
    echo: Literal[False] = False
    logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: None = None  # insertion is not served: a suffix is a 400, not ignored
    best_of: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = None  # only equal to n (no ranking)

    def prompt_input(self) -> str | list[int]:
        """The prompt as text or as token ids; ValueError says what shape is wrong."""
        if isinstance(self.prompt, str):
            return self.prompt
        if all(isinstance(p, str) for p in self.prompt):
            if len(self.prompt) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            return self.prompt[0]  # type: ignore[return-value]
        if all(isinstance(p, int) for p in self.prompt):  # each in [0, VOCAB_SIZE): TokenId
            return self.prompt  # type: ignore[return-value]
        raise ValueError("prompt must be a string, a list of one string, or a list of token ids")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether decoded JSON nests more than `limit` containers deep (iterative: a deep
    value must not cost this check the recursion it is looking for)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def check_limits(body: ChatCompletionRequest | CompletionRequest) -> tuple[str, str] | None:
    """What msgspec's `Meta` cannot say: (param, message) of the first free-form field
    nested deeper than MAX_JSON_DEPTH, or None."""
    if isinstance(body, ChatCompletionRequest) and body.tools:
        for i, tool in enumerate(body.tools):
            parameters = tool.function.parameters
            if parameters is not None and _too_deep(parameters, MAX_JSON_DEPTH):
                return (f"tools[{i}].function.parameters",
                        f"tools[{i}].function.parameters nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(body, ChatCompletionRequest) and body.response_format is not None and body.response_format.json_schema is not None:
        schema = body.response_format.json_schema.schema
        if schema is not None and _too_deep(schema, MAX_JSON_DEPTH):
            return ("response_format.json_schema.schema", f"response_format.json_schema.schema nests deeper than {MAX_JSON_DEPTH} levels")
    return None


def check_supported(body: ChatCompletionRequest | CompletionRequest) -> tuple[str, str] | None:
    """(param, message) of the first field the fabric cannot honour, or None: such a
    field is a 400 naming it, never accepted and silently dropped (issue 20)."""
    if body.logit_bias:
        return "logit_bias", "logit_bias is not supported: the emulated models sample no logits to bias (send none or {})"
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            return name, f"{name} is not supported: the emulated models sample no logits to penalise (send 0 or none)"
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of != body.n:
            return "best_of", "best_of other than n is not supported (no ranking of candidates)"
        return None
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text":
                    return (f"messages[{i}].content[{j}].type",
                            f"content parts of type {part.type!r} are not supported: the served models take text only")
    if body.functions is not None or body.function_call is not None:
        which = "functions" if body.functions is not None else "function_call"
        return which, f"{which} is the deprecated form of tools: send tools (type function) and tool_choice instead"
    if body.audio is not None or any(m != "text" for m in body.modalities or ()):
        return ("audio" if body.audio is not None else "modalities"), "only text output is served (modalities ['text'], no audio)"
    names = [tool.function.name for tool in body.tools or ()]
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        return "tool_choice", f"tool_choice names the function {choice.function.name!r}, which is not among tools"
    if choice == "required" and not names:
        return "tool_choice", "tool_choice is 'required' but no tools are given"
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema is None):
        return "response_format.json_schema.schema", "response_format of type json_schema needs json_schema.schema"
    if body.top_logprobs and not body.logprobs:
        return "top_logprobs", "top_logprobs needs logprobs: true"
    return None


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)
