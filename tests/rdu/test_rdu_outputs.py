"""The completion's token draw computes NumPy's PCG64 stream itself (seeding in Python,
short draws in Python, long ones through NumPy): it must be NumPy's stream exactly, or
every emulated completion would change."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tierflow.rdu.outputs import completion_tokens


def numpy_tokens(key: int, n: int, vocab: int) -> list[int]:
    return ((np.random.PCG64(key).random_raw(n) >> np.uint64(33)) % np.uint64(vocab)).tolist()


@pytest.mark.parametrize("n", [0, 1, 2, 11, 12, 13, 64, 700])
def test_completion_tokens_are_numpys_pcg64_stream(n: int) -> None:
    rnd = random.Random(n)
    # 64-bit keys as the plan makes them, any width up to SeedSequence's 4-word pool, and
    # wider keys (left to NumPy)
    keys = [rnd.getrandbits(64) for _ in range(100)] + [rnd.getrandbits(rnd.randint(1, 128)) for _ in range(50)]
    keys += [0, 1, 1 << 32, 1 << 96, (1 << 128) - 1, 1 << 128, rnd.getrandbits(200)]
    for key in keys:
        for vocab in (1024, 7):
            assert completion_tokens(key, n, vocab) == numpy_tokens(key, n, vocab), (key, n, vocab)
