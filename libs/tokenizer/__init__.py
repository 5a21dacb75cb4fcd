"""A deterministic stand-in tokenizer shared by the router, the nodes and the simulator.

The emulator has no real weights, so it needs no real vocabulary; what it does need is
that every part of the fabric counts and hashes a prompt the same way. The router turns
a prompt into token ids (for usage, sequence-length checks and prefix-block hashes used
by placement), the node hashes the same ids into KV blocks, and the simulator counts the
same tokens offline. Splitting follows the GPT-2 family's shape (a leading space sticks to
the word after it), so counts land near a BPE tokenizer's on English text.

Generated text uses a small fixed vocabulary of words, each exactly one token, so a
completion fed back as history re-tokenizes to the same count it was billed for.

`encode` runs in one go (about 90 ms a MiB), which is right for a small prompt and wrong
on the router's event loop for a big one: an 8 MiB prompt would stall every other stream
for most of a second. `encode_async` gives exactly the same ids but works through the text
in windows of `CHUNK_CHARS` characters, yielding to the event loop after each (about half
a millisecond of work), and stops as soon as the count passes a `limit`, raising
`TokenLimitExceeded`: a prompt longer than the model's context is refused without
tokenizing the rest of it.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Final

from .pieces import is_piece, piece_text

__all__ = [
    "VOCAB_SIZE",
    "OUTPUT_VOCAB",
    "CHUNK_CHARS",
    "TokenLimitExceeded",
    "encode",
    "encode_async",
    "count_tokens",
    "decode_output",
    "render_chat",
]

VOCAB_SIZE: Final = 1 << 17
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+(?!\S)|\s+")
_CACHE_LIMIT: Final = 1 << 16
_CACHED_PIECE_CHARS: Final = 64  # longer pieces are rare; cached, a few huge ones would pin megabytes
_piece_ids: dict[str, int] = {}


def _piece_id(piece: str) -> int:
    token_id = _piece_ids.get(piece)
    if token_id is None:
        token_id = zlib.crc32(piece.encode()) % VOCAB_SIZE
        if len(_piece_ids) < _CACHE_LIMIT and len(piece) <= _CACHED_PIECE_CHARS:
            _piece_ids[piece] = token_id
    return token_id


def encode(text: str) -> list[int]:
    """Token ids of `text`; equal texts give equal ids, so prefixes hash alike."""
    return [_piece_id(piece) for piece in _PIECE.findall(text)]


def count_tokens(text: str) -> int:
    return len(_PIECE.findall(text))


# ------------------------------------------------------------------ tokenizing in windows
CHUNK_CHARS: Final = 8192
"""Characters `encode_async` tokenizes between two yields to the event loop. Measured on
the 2-core dev machine with an 8 MiB English-like prompt: 1,026 yields, 0.6 ms between
two at the median and 1.25 ms at most, 0.65 s in all (`encode`: 0.75 s in one block);
16384 doubled the gaps (max 3.2 ms) for no gain in total time."""

_LETTER_RUN = re.compile(r" ?[A-Za-z]+")  # _PIECE's first alternative, alone
_SPACE_RUN = re.compile(r"\s\s+")
_NOT_LETTER = re.compile(r"[^A-Za-z]")
_NOT_SPACE = re.compile(r"\S")


class TokenLimitExceeded(ValueError):
    """The text has more than `limit` tokens; `found` (> limit) were counted before
    tokenizing stopped, so it is a lower bound on the text's length, not its length."""

    def __init__(self, found: int, limit: int) -> None:
        super().__init__(f"the text has more than {limit} tokens (counting stopped at {found})")
        self.found = found
        self.limit = limit


def _run_end(text: str, not_in_run: re.Pattern[str], start: int, window: int) -> Generator[list[str], None, int]:
    """Where the run of characters going on at `start` ends, looked for one window at a
    time (yielding an empty step after each, so the caller can let the loop run)."""
    n = len(text)
    while True:
        stop = min(start + window, n)
        found = not_in_run.search(text, start, stop)
        if found is not None:
            return found.start()
        if stop == n:
            return n
        start = stop
        yield []


def _piece_steps(text: str, window: int) -> Iterator[list[str]]:
    """`_PIECE.findall(text)`, as consecutive lists of pieces, each found by about
    `window` characters of regex work (a step may be empty).

    Why this is exact: the pieces cover the text without gaps (every character matches
    some alternative), and scanning `text[pos:pos + window]` finds the same pieces as
    scanning the whole text except possibly the last one: a piece whose match could
    depend on what lies past the window (a greedy run or the `(?!\\S)` lookahead
    reaching its end) can only be the one that ends there. So each step keeps all but
    the last piece and resumes where the last one starts. A single piece filling the
    window is a run of letters or whitespace longer than it; its end is found window by
    window (so one 8 MiB "word" does not become one 40 ms regex call) and the piece is
    what `_PIECE` makes of such a run. Any other single piece (windows of a few
    characters only) is looked at again through a window twice as large.
    """
    n = len(text)
    pos = 0
    grow = window
    while pos < n:
        end = pos + grow
        if end >= n:
            yield _PIECE.findall(text, pos)
            return
        pieces = _PIECE.findall(text, pos, end)
        last = pieces.pop()
        if pieces:
            yield pieces
            pos, grow = end - len(last), window
        elif grow >= 2 and _LETTER_RUN.fullmatch(text, pos, end):
            # " ?[A-Za-z]+" matches first and has no lookahead: the piece is the whole run.
            stop = yield from _run_end(text, _NOT_LETTER, end, window)
            yield [text[pos:stop]]
            pos, grow = stop, window
        elif grow >= 2 and _SPACE_RUN.fullmatch(text, pos, end):
            # Two or more spaces: the letter/digit/symbol alternatives cannot start here;
            # "\s+(?!\S)" takes the run up to the end of the text, or all but its last
            # character (which then leads the next piece).
            stop = yield from _run_end(text, _NOT_SPACE, end, window)
            if stop < n:
                stop -= 1
            yield [text[pos:stop]]
            pos, grow = stop, window
        else:
            grow *= 2


async def encode_async(text: str, *, limit: int | None = None, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """`encode(text)`, exactly, without holding the event loop: the text is tokenized
    `chunk_chars` characters at a time, with a yield to the loop after each window.

    With `limit`, raises `TokenLimitExceeded` as soon as more than `limit` tokens were
    found, without tokenizing the rest (a prompt that cannot fit the model's context is
    refused at the cost of reading `limit` tokens of it, however long it is). A text of
    at most `chunk_chars` characters is encoded at once, with no yield.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
    if len(text) <= chunk_chars:
        ids = encode(text)
        if limit is not None and len(ids) > limit:
            raise TokenLimitExceeded(len(ids), limit)
        return ids
    ids = []
    for pieces in _piece_steps(text, chunk_chars):
        ids += map(_piece_id, pieces)
        if limit is not None and len(ids) > limit:
            raise TokenLimitExceeded(len(ids), limit)
        await asyncio.sleep(0)
    return ids


def _build_output_vocab() -> tuple[str, ...]:
    # Pronounceable words from syllables: deterministic, no data file to ship.
    onsets = ("b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
    vowels = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
    codas = ("", "n", "r", "s", "t", "l", "m", "nd")
    words = [f" {o}{v}{c}" for o in onsets for v in vowels for c in codas]
    return tuple(words)


OUTPUT_VOCAB: Final[tuple[str, ...]] = _build_output_vocab()


def decode_output(token_ids: Iterable[int]) -> str:
    """Text of generated token ids: indices into OUTPUT_VOCAB, or structured-output
    pieces (`tierflow.tokenizer.pieces`: JSON a schema asked for)."""
    vocab = OUTPUT_VOCAB
    size = len(vocab)
    return "".join(vocab[i] if i < size else piece_text(i) if is_piece(i) else vocab[i % size] for i in token_ids)


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt a chat turns into: one fixed template for every model.

    A fixed template keeps a conversation's earlier turns a byte-identical prefix of
    its later prompts, which is what the prefix cache and placement key on.
    """
    parts = [f"<|{role}|>\n{content}\n" for role, content in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)
