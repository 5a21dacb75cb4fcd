"""Deterministic completions: the same (model, seed, prompt) always yields the same tokens.

The emulator has no weights, so it draws output from a generator keyed by a BLAKE2b digest
of (model, seed, prompt). The digest also fixes the completion's natural length, where
the "model" would emit EOS: exponential with mean `MEAN_NATURAL_TOKENS`, at least 1 token.

Token ids are indices into `tierflow.tokenizer.OUTPUT_VOCAB`, drawn in one vectorised call
per request from NumPy's PCG64 raw stream (bit generators' streams are stable across NumPy
versions, unlike `Generator` methods), so a benchmark emitting millions of tokens pays a
few nanoseconds per token here instead of a Python-level generator step.
"""

from __future__ import annotations

import math
from hashlib import blake2b
from typing import Final

import numpy as np

__all__ = ["MEAN_NATURAL_TOKENS", "output_plan", "completion_tokens"]

MEAN_NATURAL_TOKENS: Final = 256
_MASK64: Final = (1 << 64) - 1
_SHIFT: Final = np.uint64(33)


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
    """The first `n` token ids of the completion keyed by `key`."""
    if n <= 0:
        return []
    raw = np.random.PCG64(key).random_raw(n)
    tokens: list[int] = ((raw >> _SHIFT) % np.uint64(vocab_size)).tolist()
    return tokens
