"""The OpenAI request bodies the router accepts, as msgspec Structs.

Unknown fields are ignored (clients send many we do not use), types are checked on
decode, and msgspec's error names the path (`at $.messages[0].content`), which becomes
the `param` of the 400 answer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = ["ChatCompletionRequest", "CompletionRequest", "chat_decoder", "completion_decoder", "ContentPart", "ChatMessage"]

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]


class StreamOptions(Struct):
    include_usage: bool = False


class ContentPart(Struct):
    type: str
    text: str = ""


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class _Sampling(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1  # one choice per request; n > 1 is refused, not ignored
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks, replay)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_Sampling, kw_only=True):
    # A string, a one-string list, or token ids (checked in `prompt_input`: msgspec
    # unions may hold only one array type).
    prompt: str | Annotated[list[str | int], Meta(min_length=1)]
    echo: Literal[False] = False

    def prompt_input(self) -> str | list[int]:
        """The prompt as text or as token ids; ValueError says what shape is wrong."""
        if isinstance(self.prompt, str):
            return self.prompt
        if all(isinstance(p, str) for p in self.prompt):
            if len(self.prompt) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            return self.prompt[0]  # type: ignore[return-value]
        if all(isinstance(p, int) and p >= 0 for p in self.prompt):
            return self.prompt  # type: ignore[return-value]
        raise ValueError("prompt must be a string, a list of one string, or a list of token ids")


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)
