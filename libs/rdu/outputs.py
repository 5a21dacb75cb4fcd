"""Deterministic completions: the same (model, seed, prompt) always yields the same tokens.

The emulator has no weights, so it draws output from a generator keyed by a BLAKE2b digest
of (model, seed, prompt). The digest also fixes the completion's natural length, where
the "model" would emit EOS: exponential with mean `MEAN_NATURAL_TOKENS`, at least 1 token.

Token ids are indices into `tierflow.tokenizer.OUTPUT_VOCAB`, drawn from NumPy's PCG64 raw
stream seeded with the key (bit generators' streams are stable across NumPy versions,
unlike `Generator` methods). A long completion is one vectorised NumPy call, a few
nanoseconds a token. Seeding is the per-request cost: `PCG64(key)` runs NumPy's
`SeedSequence` through Python-level machinery (~25 us, more than the rest of a one-token
request's engine work, issue 16), so `_pcg64_state` computes the same seed in plain
Python (~6 us) and a short completion steps the generator in Python too; a long one
hands that state to NumPy. Both give NumPy's exact stream (tests/rdu check them against
`PCG64(key).random_raw`).
"""

from __future__ import annotations

import math
from hashlib import blake2b
from typing import Final

import numpy as np

__all__ = ["MEAN_NATURAL_TOKENS", "completion_tokens", "output_plan"]

MEAN_NATURAL_TOKENS: Final = 256
_MASK64: Final = (1 << 64) - 1
_SHIFT: Final = np.uint64(33)
# Up to this many tokens a Python loop beats setting up NumPy (~0.4 us a token against
# ~8 us of NumPy call overhead).
_PYTHON_TOKENS: Final = 12

# NumPy's SeedSequence (pool size 4) and PCG64 constants, numpy/random/bit_generator.pyx
# and pcg64.h: the algorithm is NumPy's documented, stable seeding.
_M32: Final = 0xFFFFFFFF
_M128: Final = (1 << 128) - 1
_MIX_L: Final = 0xCA01F9DD
_MIX_R: Final = 0x4973F715
_PCG_MULT: Final = (2549297995355413924 << 64) | 4865540595714422341


def _hash_consts(h: int, mult: int, n: int) -> list[tuple[int, int]]:
    """SeedSequence's hash constant before and after each of `n` hashmix calls: it does
    not depend on the data, so the whole sequence is fixed."""
    out = []
    for _ in range(n):
        nxt = (h * mult) & _M32
        out.append((h, nxt))
        h = nxt
    return out


_ENTROPY_HASH = _hash_consts(0x43B0D7E5, 0x931E8875, 16)  # mix_entropy: 4 words, then 12 mixes
_ENTROPY_IN = tuple((shift, x, m) for shift, (x, m) in zip((0, 32, 64, 96), _ENTROPY_HASH[:4]))
_ENTROPY_MIX = tuple(
    (src, dst, *_ENTROPY_HASH[4 + k])
    for k, (src, dst) in enumerate((s, d) for s in range(4) for d in range(4) if s != d)
)
_STATE_OUT = tuple((i & 3, x, m) for i, (x, m) in enumerate(_hash_consts(0x8B51F9DD, 0x58F38DED, 8)))
_bit_generator = np.random.PCG64(0)  # reseeded for every long completion (one thread)


def output_plan(model: str, seed: int, packed_prompt: bytes) -> tuple[int, int]:
    """(natural completion length, 64-bit generator key) for one request."""
    h = blake2b(digest_size=16)
    h.update(model.encode())
    h.update(b"\0")
    h.update((seed & _MASK64).to_bytes(8, "little"))
    h.update(packed_prompt)
    digest = h.digest()
    u = (int.from_bytes(digest[:8], "little") >> 11) / (1 << 53)  # uniform in [0, 1)
    natural = 1 + int(-MEAN_NATURAL_TOKENS * math.log1p(-u))
    return natural, int.from_bytes(digest[8:], "little")


def completion_tokens(key: int, n: int, vocab_size: int) -> list[int]:
    """The first `n` token ids of the completion keyed by `key`: the top 31 bits of each
    of `PCG64(key).random_raw(n)`, modulo the vocabulary."""
    if n <= 0:
        return []
    if not 0 <= key < 1 << 128:  # more than SeedSequence's pool of 4 words: let NumPy
        raw = np.random.PCG64(key).random_raw(n)
        return ((raw >> _SHIFT) % np.uint64(vocab_size)).tolist()  # type: ignore[no-any-return]
    state, inc = _pcg64_state(key)
    if n <= _PYTHON_TOKENS:
        mult, m128 = _PCG_MULT, _M128
        tokens = []
        for _ in range(n):
            state = (state * mult + inc) & m128
            x = ((state >> 64) ^ state) & _MASK64
            rot = state >> 122
            tokens.append(((((x >> rot) | (x << (64 - rot))) & _MASK64) >> 33) % vocab_size)
        return tokens
    gen = _bit_generator
    gen.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}
    raw = gen.random_raw(n)
    return ((raw >> _SHIFT) % np.uint64(vocab_size)).tolist()  # type: ignore[no-any-return]


def _pcg64_state(key: int) -> tuple[int, int]:
    """(state, increment) of `np.random.PCG64(key)` for a key of at most four 32-bit
    words (SeedSequence mixes a missing word as a zero one): SeedSequence(key)
    .generate_state(4, uint64), then pcg64_set_seed."""
    pool = []
    for shift, x, m in _ENTROPY_IN:
        v = ((((key >> shift) & _M32) ^ x) * m) & _M32
        pool.append(v ^ (v >> 16))
    for src, dst, x, m in _ENTROPY_MIX:
        v = ((pool[src] ^ x) * m) & _M32
        r = (_MIX_L * pool[dst] - _MIX_R * (v ^ (v >> 16))) & _M32
        pool[dst] = r ^ (r >> 16)
    w = []
    for i, x, m in _STATE_OUT:
        v = ((pool[i] ^ x) * m) & _M32
        w.append(v ^ (v >> 16))
    seed = (w[0] | w[1] << 32) << 64 | (w[2] | w[3] << 32)
    inc = (((w[4] | w[5] << 32) << 64 | (w[6] | w[7] << 32)) << 1 | 1) & _M128
    # pcg_setseq_128_srandom_r: state 0, one step, add the seed, one more step
    return ((inc + seed) * _PCG_MULT + inc) & _M128, inc
