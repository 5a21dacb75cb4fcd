"""The prompt of one trace row: exactly its input tokens, sharing text where its prefix blocks are shared.

A trace gives each request's length and, in Mooncake's format, the ids of its 512-token
prefix blocks (`hash_ids`): two requests with the same leading ids began with the same
text. A replay turns each row into a chat prompt with one user message, rendered by
`tierflow.tokenizer.render_chat`:

    <|user|>\\n{words}\\n<|assistant|>\\n      = HEAD_TOKENS + len(words) + TAIL_TOKENS tokens

so the message holds `tokens - TEMPLATE_TOKENS` words, each one token (the tokenizer's
output vocabulary: a space and letters). Token position q of the prompt lies in trace
block q // 512, and a word there is drawn from that block's id and q % 512 alone, so two
rows whose leading ids agree agree token for token over those blocks: they hash alike
in the emulator's prefix cache (64-token blocks, chained, so a block only matches after
an equal prefix) and in the router's placement. The template's head is part of block 0,
as it is part of the prompt the trace measured.

Blocks past a row's `hash_ids` (formats without ids, or a row whose ids cover only part
of it) take their words from the row's own key: unique text. The words also depend on
the prompt's `space` (the run's seed and the replica of a rate-scaled row), so replicas
and runs with another seed share nothing.

Words come from a counter-based hash (splitmix64 of block seed + offset), vectorised in
numpy, never from a seeded generator per block: a trace hour holds ~10^5 distinct blocks
and a simulation asks for millions of prompts, so building a prompt must cost a few
array operations, not a generator per block. Token ids are looked up per word, never
re-encoded from text; `prompt_text` exists for the live driver, which sends text.
"""

from __future__ import annotations

from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from tierflow.tokenizer import OUTPUT_VOCAB, encode, render_chat

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "TEMPLATE_TOKENS",
    "HEAD_TOKENS",
    "TAIL_TOKENS",
    "TracePrompt",
    "message_ids",
    "prompt_text",
    "prompt_token_ids",
]

TRACE_BLOCK_TOKENS: Final = 512  # Mooncake's hash_ids block, and tierflow's own trace's


def _template() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids a one-user-message prompt has before its words and after them."""
    marker = OUTPUT_VOCAB[0]
    ids = encode(render_chat([("user", marker)]))
    at = ids.index(encode(marker)[0])
    return tuple(ids[:at]), tuple(ids[at + 1 :])


_HEAD_IDS, _TAIL_IDS = _template()
HEAD_TOKENS: Final = len(_HEAD_IDS)  # `<|user|>` and its newline
TAIL_TOKENS: Final = len(_TAIL_IDS)  # the message's newline and the assistant cue
TEMPLATE_TOKENS: Final = HEAD_TOKENS + TAIL_TOKENS  # the shortest prompt a chat can send (an empty message)
_CUE_TOKENS: Final = len(encode(render_chat([])))  # the tail's part that is the assistant cue, not the message

_VOCAB: Final = np.array(OUTPUT_VOCAB)
_VOCAB_IDS: Final = np.array([encode(word)[0] for word in OUTPUT_VOCAB], dtype=np.int64)
_SHARED_TAG: Final = 0x5348415245440000  # block seeds of shared ids and of a row's own blocks never meet
_UNIQUE_TAG: Final = 0x554E495155450000
_U64 = npt.NDArray[np.uint64]


class TracePrompt(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A trace row's prompt, synthesized on use (see the module docstring).

    `tokens`: the whole prompt's length, template included (at least TEMPLATE_TOKENS);
    `hash_ids`: the ids of its leading 512-token blocks; `row`: the key of its own text
    past them; `space`: the prefix space (seed and replica) its text is drawn in.
    """

    tokens: int
    hash_ids: tuple[int, ...]
    row: int
    space: int


def _splitmix(x: _U64) -> _U64:
    """splitmix64's finaliser: a bijection on 64-bit ints that scatters neighbouring inputs."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _words(prompt: TracePrompt) -> npt.NDArray[np.int64]:
    """Indices into OUTPUT_VOCAB of the user message's words."""
    count = prompt.tokens - TEMPLATE_TOKENS
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    position = np.arange(HEAD_TOKENS, HEAD_TOKENS + count, dtype=np.uint64)  # in the whole prompt
    blocks = int(position[-1]) // TRACE_BLOCK_TOKENS + 1
    shared = min(len(prompt.hash_ids), blocks)
    keys = np.empty(blocks, dtype=np.uint64)
    keys[:shared] = np.array(prompt.hash_ids[:shared], dtype=np.uint64) ^ np.uint64(_SHARED_TAG)
    keys[shared:] = (np.uint64(prompt.row) << np.uint64(20)) + np.arange(shared, blocks, dtype=np.uint64) ^ np.uint64(_UNIQUE_TAG)
    seeds = _splitmix(_splitmix(keys) ^ np.uint64(prompt.space))
    block_of = position // np.uint64(TRACE_BLOCK_TOKENS)
    offset = position % np.uint64(TRACE_BLOCK_TOKENS)
    return (_splitmix(seeds[block_of] + offset) % np.uint64(_VOCAB.size)).astype(np.int64)


def prompt_text(prompt: TracePrompt) -> str:
    """The user message's text (the chat template adds the rest)."""
    return "".join(_VOCAB[_words(prompt)].tolist())


def message_ids(prompt: TracePrompt) -> list[int]:
    """The ids the user message adds to a prompt: what `Conversation` keeps for it, equal to
    encoding `render_chat([("user", prompt_text(prompt))])` without its assistant cue."""
    return [*_HEAD_IDS, *_VOCAB_IDS[_words(prompt)].tolist(), *_TAIL_IDS[: len(_TAIL_IDS) - _CUE_TOKENS]]


def prompt_token_ids(prompt: TracePrompt) -> list[int]:
    """The whole prompt's ids: exactly `prompt.tokens` of them."""
    return [*_HEAD_IDS, *_VOCAB_IDS[_words(prompt)].tolist(), *_TAIL_IDS]
