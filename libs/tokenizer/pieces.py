"""Output tokens for structured text (JSON arguments and content), beside the word vocabulary.

Free text is drawn from `OUTPUT_VOCAB` (ids below its size). Structured output (a tool
call's arguments, content that must validate against a JSON schema) needs arbitrary
ASCII: braces, quotes, digits, property names from the client's schema. Its tokens are
the prompt tokenizer's pieces (`_PIECE`: a word with its leading space, up to three
digits, one punctuation mark, a whitespace run), each cut into chunks of at most
`PIECE_CHARS` characters, and the chunk's text is packed into the id itself:

    id = PIECE_BASE | (len - 1) << 28 | c0 << 21 | c1 << 14 | c2 << 7 | c3

so every id decodes to its text anywhere (router, node, a resumed leg on another node)
with no shared table, and every id fits the 32 bits a token id may take on the wire
(`messages.TokenIds`). JSON text is ASCII once its non-ASCII characters are escaped
(`json.dumps(ensure_ascii=True)`), which is how it is produced.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["PIECE_BASE", "PIECE_CHARS", "OutputTexts", "encode_pieces", "is_piece", "piece_text"]

PIECE_BASE: Final = 1 << 31
PIECE_CHARS: Final = 4
# The prompt tokenizer's split (tierflow.tokenizer._PIECE), so structured text counts
# alike both ways as long as its pieces are short.
_SPLIT = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+(?!\S)|\s+")


def _pack(chunk: str) -> int:
    value = 0
    for ch in chunk:
        code = ord(ch)
        if code > 0x7F:
            raise ValueError(f"structured output must be ASCII (escape it), got {ch!r}")
        value = value << 7 | code
    value <<= 7 * (PIECE_CHARS - len(chunk))
    return PIECE_BASE | (len(chunk) - 1) << 28 | value


def encode_pieces(text: str) -> list[int]:
    """Token ids of ASCII `text` as structured output; `piece_text` decodes each."""
    ids: list[int] = []
    for piece in _SPLIT.findall(text):
        for start in range(0, len(piece), PIECE_CHARS):
            ids.append(_pack(piece[start : start + PIECE_CHARS]))
    return ids


def is_piece(token_id: int) -> bool:
    return PIECE_BASE <= token_id < PIECE_BASE + (1 << 30)


def piece_text(token_id: int) -> str:
    """The text of a structured-output token id (ValueError for any other id)."""
    if not is_piece(token_id):
        raise ValueError(f"{token_id} is not a structured-output token id")
    n = (token_id >> 28 & 3) + 1
    value = token_id & ((1 << 28) - 1)
    return "".join(chr(value >> (7 * (PIECE_CHARS - 1 - i)) & 0x7F) for i in range(n))


class OutputTexts(dict[int, str]):
    """Token id -> text for a node's engine: the word vocabulary, looked up like a tuple,
    and any structured-output piece decoded on demand (not kept: ids are unbounded)."""

    def __missing__(self, token_id: int) -> str:
        return piece_text(token_id)
