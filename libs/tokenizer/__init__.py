"""A deterministic stand-in tokenizer shared by the router, the nodes and the simulator.

The emulator has no real weights, so it needs no real vocabulary; what it does need is
that every part of the fabric counts and hashes a prompt the same way. The router turns
a prompt into token ids (for usage, sequence-length checks and prefix-block hashes used
by placement), the node hashes the same ids into KV blocks, and the simulator counts the
same tokens offline. Splitting follows the GPT-2 family's shape (a leading space sticks to
the word after it), so counts land near a BPE tokenizer's on English text.

Generated text uses a small fixed vocabulary of words, each exactly one token, so a
completion fed back as history re-tokenizes to the same count it was billed for.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "VOCAB_SIZE",
    "OUTPUT_VOCAB",
    "encode",
    "count_tokens",
    "decode_output",
    "render_chat",
]

VOCAB_SIZE: Final = 1 << 17
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+(?!\S)|\s+")
_CACHE_LIMIT: Final = 1 << 16
_piece_ids: dict[str, int] = {}


def _piece_id(piece: str) -> int:
    token_id = _piece_ids.get(piece)
    if token_id is None:
        token_id = zlib.crc32(piece.encode()) % VOCAB_SIZE
        if len(_piece_ids) < _CACHE_LIMIT:
            _piece_ids[piece] = token_id
    return token_id


def encode(text: str) -> list[int]:
    """Token ids of `text`; equal texts give equal ids, so prefixes hash alike."""
    return [_piece_id(piece) for piece in _PIECE.findall(text)]


def count_tokens(text: str) -> int:
    return len(_PIECE.findall(text))


def _build_output_vocab() -> tuple[str, ...]:
    # Pronounceable words from syllables: deterministic, no data file to ship.
    onsets = ("b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
    vowels = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
    codas = ("", "n", "r", "s", "t", "l", "m", "nd")
    words = [f" {o}{v}{c}" for o in onsets for v in vowels for c in codas]
    return tuple(words)


OUTPUT_VOCAB: Final[tuple[str, ...]] = _build_output_vocab()


def decode_output(token_ids: Iterable[int]) -> str:
    """Text of generated token ids (indices into OUTPUT_VOCAB)."""
    vocab = OUTPUT_VOCAB
    size = len(vocab)
    return "".join(vocab[i % size] for i in token_ids)


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt a chat turns into: one fixed template for every model.

    A fixed template keeps a conversation's earlier turns a byte-identical prefix of
    its later prompts, which is what the prefix cache and placement key on.
    """
    parts = [f"<|{role}|>\n{content}\n" for role, content in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)
