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

A simulated call needs only the prompt's length and its block hashes, never its ids:
`prompt_tokens` is arithmetic, and `prompt_block_hashes` hashes ids made as uint32
bytes in numpy and reuses the hashes of shared 512-token blocks it has hashed before
(see there), since a replay asks for the same prefixes again and again.
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from tierflow.rdu.kvcache import hashes_from_packed
from tierflow.tokenizer import OUTPUT_VOCAB, encode, render_chat

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "TEMPLATE_TOKENS",
    "HEAD_TOKENS",
    "TAIL_TOKENS",
    "TracePrompt",
    "BlockMemo",
    "message_ids",
    "message_tokens",
    "prompt_block_hashes",
    "prompt_text",
    "prompt_token_ids",
    "prompt_tokens",
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


def _words(prompt: TracePrompt) -> _U64:
    """Indices into OUTPUT_VOCAB of the user message's words."""
    count = prompt.tokens - TEMPLATE_TOKENS
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    return _word_index(prompt, HEAD_TOKENS, HEAD_TOKENS + count)


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


def prompt_tokens(prompt: TracePrompt) -> int:
    """`len(prompt_token_ids(prompt))`, without building them: the template, plus the
    words when the row is longer than the template (a shorter row is an empty message)."""
    return max(prompt.tokens, TEMPLATE_TOKENS)


def message_tokens(prompt: TracePrompt) -> int:
    """`len(message_ids(prompt))`, without building them."""
    return prompt_tokens(prompt) - _CUE_TOKENS


# -- block hashes without token ids ----------------------------------------------------

_OFFSETS: Final = np.arange(TRACE_BLOCK_TOKENS, dtype=np.uint64)
_IDS_LE: Final = _VOCAB_IDS.astype("<u4")  # the bytes `tierflow.rdu.pack_tokens` makes of each word's id
_HEAD_LE: Final = np.array(_HEAD_IDS, dtype="<u4")
_TAIL_LE: Final = np.array(_TAIL_IDS, dtype="<u4")
_ROOT: Final = bytes(8)  # the chain's start, as in `tierflow.rdu.kvcache`
_DIGEST: Final = 8  # bytes of one chained hash
_MEMO_ENTRIES: Final = 1 << 16  # see BlockMemo


def _splitmix_inplace(x: _U64) -> _U64:
    """splitmix64's finaliser (a bijection on 64-bit ints that scatters neighbouring
    inputs), overwriting `x` (an array: numpy's integer array arithmetic wraps without a
    warning). Half the temporaries: this runs on every token of a fresh block."""
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _vocab_index(x: _U64) -> _U64:
    """`x % vocabulary size`; a mask when the size is a power of two (a 64-bit modulo
    costs several times the rest of a word's arithmetic)."""
    size = _VOCAB.size
    return x & np.uint64(size - 1) if size & (size - 1) == 0 else x % np.uint64(size)


_M64: Final = (1 << 64) - 1


def _splitmix_int(x: int) -> int:
    """`_splitmix_inplace` of one Python int in [0, 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _uint64(value: int) -> int:
    """`value`, refused as numpy refuses it as a uint64 (trace ids, rows and spaces fit)."""
    if not 0 <= value <= _M64:
        raise OverflowError(f"Python integer {value} out of bounds for uint64")
    return value


def _block_seeds(prompt: TracePrompt, first: int, last: int) -> _U64:
    """The word seeds of trace blocks `first`..`last - 1`, in Python ints: for the few
    blocks a prompt has, numpy's per-call overhead would cost more than the arithmetic."""
    ids, space = prompt.hash_ids, _uint64(prompt.space)
    own = (_uint64(prompt.row) << 20) & _M64
    seeds = [
        _splitmix_int(_splitmix_int(_uint64(ids[b]) ^ _SHARED_TAG if b < len(ids) else ((own + b) & _M64) ^ _UNIQUE_TAG) ^ space)
        for b in range(first, last)
    ]
    return np.array(seeds, dtype=np.uint64)


def _word_index(prompt: TracePrompt, lo: int, hi: int) -> _U64:
    """The vocabulary index of the word at each prompt position in [lo, hi): the words of
    whole trace blocks (seed + offset, so no position arithmetic per token), sliced."""
    first, last = lo // TRACE_BLOCK_TOKENS, (hi - 1) // TRACE_BLOCK_TOKENS + 1
    grid = (_block_seeds(prompt, first, last)[:, None] + _OFFSETS).ravel()
    base = first * TRACE_BLOCK_TOKENS
    return _vocab_index(_splitmix_inplace(grid[lo - base : hi - base]))


def _packed_ids(prompt: TracePrompt, lo: int, hi: int) -> bytes:
    """`tierflow.rdu.pack_tokens(prompt_token_ids(prompt)[lo:hi])`, made in numpy: the
    words' ids, then the template's head and tail written over their positions."""
    if hi <= lo:
        return b""
    ids = _IDS_LE[_word_index(prompt, lo, hi)]
    if lo < HEAD_TOKENS:
        ids[: min(hi, HEAD_TOKENS) - lo] = _HEAD_LE[lo : min(hi, HEAD_TOKENS)]
    words_end = prompt_tokens(prompt) - TAIL_TOKENS
    if hi > words_end:
        tail = max(lo, words_end)
        ids[tail - lo :] = _TAIL_LE[tail - words_end : hi - words_end]
    return ids.tobytes()


def _chain(packed: bytes, block_size: int, prev: bytes) -> bytes:
    """The chained digests of `packed`'s blocks after `prev`, concatenated:
    `tierflow.rdu.hashes_from_packed` from the middle of a chain (BLAKE2b of the previous
    digest then the block's bytes, one call per block; `packed` holds whole blocks only)."""
    step = 4 * block_size
    digests = bytearray()
    for start in range(0, len(packed), step):
        prev = blake2b(prev + packed[start : start + step], digest_size=_DIGEST).digest()
        digests += prev
    return bytes(digests)


_MemoKey = tuple[int, bytes, int, int, int]  # space, digest before the trace block, its hash id, its index, block size


class BlockMemo:
    """The chained hashes inside shared trace blocks, by what fixes them: the prompt's
    `space`, the digest the chain enters the block with, the block's hash id and index
    (block 0 holds the template's head) and the block size. The value is the digests
    (8 bytes each, concatenated) of the block's leading cache blocks that hold no token of
    the template's tail (all of them, unless the prompt ends in this block).

    Bounded, least recently used out first: a replay of the Mooncake-like hour meets
    ~1.8e5 distinct shared blocks per replica (3.5e6 at rate scale 20), most of them once,
    while the blocks that do repeat (agent templates, a session's earlier turns) repeat
    within minutes. An unbounded memo would grow with the replay for nothing; the default
    2**16 entries (~25 MB) find 58 % of the shared blocks of its first six minutes at rate
    scale 20, where an unbounded one finds 59 %. Exact whatever it holds or dropped: a key
    fixes every token of its blocks and the chain before them. Not thread-safe: the
    simulator runs one thread per process, each with its own memo.
    """

    __slots__ = ("capacity", "_entries")

    def __init__(self, capacity: int = _MEMO_ENTRIES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[_MemoKey, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _MemoKey) -> bytes | None:
        digests = self._entries.get(key)
        if digests is not None:
            self._entries.move_to_end(key)
        return digests

    def put(self, key: _MemoKey, digests: bytes) -> None:
        entries = self._entries
        if key in entries:  # a longer run of the block's digests than it held
            entries.move_to_end(key)
        entries[key] = digests
        if len(entries) > self.capacity:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


_MEMO: Final = BlockMemo()  # one per process: the simulator's prompts all pass through it


def prompt_block_hashes(prompt: TracePrompt, block_size: int, *, memo: BlockMemo | None = None) -> list[int]:
    """Exactly `tierflow.rdu.block_hashes(prompt_token_ids(prompt), block_size)`, at a
    fraction of the cost: no list of ids, and the leading shared trace blocks whose
    hashes `memo` (the process's, by default) holds are not hashed again.

    A cache block wholly inside a shared trace block, and before the template's tail,
    holds tokens fixed by the block's hash id, its index and the prompt's space, so its
    chained hash is fixed by those and the digest the chain enters the trace block with.
    The leading run of such trace blocks found in the memo is taken from it; from the
    first one missing, the rest of the prompt is made in numpy and hashed, and its shared
    trace blocks are remembered. A block size that does not divide 512 puts cache blocks
    across trace blocks: those prompts are hashed whole.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n = prompt_tokens(prompt)
    if TRACE_BLOCK_TOKENS % block_size:
        return hashes_from_packed(_packed_ids(prompt, 0, n), block_size)
    memo = _MEMO if memo is None else memo
    per = TRACE_BLOCK_TOKENS // block_size
    words_end = n - TAIL_TOKENS
    parts: list[bytes] = []
    prev = _ROOT
    done = 0  # cache blocks whose digests are in `parts`
    for index, hash_id in enumerate(prompt.hash_ids):
        whole = min(per, (words_end - index * TRACE_BLOCK_TOKENS) // block_size)  # its cache blocks of words only
        if whole <= 0:
            break
        digests = memo.get((prompt.space, prev, hash_id, index, block_size))
        if digests is None or len(digests) < whole * _DIGEST:
            break
        digests = digests[: whole * _DIGEST]
        parts.append(digests)
        prev = digests[-_DIGEST:]
        done += whole
        if whole < per:  # the words end in this block: nothing shared follows
            break
    total = n // block_size
    if done < total:
        fresh = _chain(_packed_ids(prompt, done * block_size, total * block_size), block_size, prev)
        if done % per == 0:
            _remember(prompt, block_size, done // per, fresh, prev, memo)
        parts.append(fresh)
    hashes: list[int] = np.frombuffer(b"".join(parts), dtype="<u8").tolist()
    return hashes


def _remember(prompt: TracePrompt, block_size: int, first: int, fresh: bytes, prev: bytes, memo: BlockMemo) -> None:
    """Put the shared trace blocks from `first` on, whose digests `fresh` holds (it starts
    at that block, after `prev`), into the memo."""
    per = TRACE_BLOCK_TOKENS // block_size
    words_end = prompt_tokens(prompt) - TAIL_TOKENS
    for index in range(first, len(prompt.hash_ids)):
        whole = min(per, (words_end - index * TRACE_BLOCK_TOKENS) // block_size)
        if whole <= 0:
            break
        at = (index - first) * per * _DIGEST
        memo.put((prompt.space, fresh[at - _DIGEST : at] if at else prev, prompt.hash_ids[index], index, block_size), fresh[at : at + whole * _DIGEST])
