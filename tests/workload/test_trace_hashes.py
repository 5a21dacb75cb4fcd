"""A trace prompt's block hashes without its ids: exactly `block_hashes(prompt_token_ids(p), bs)`, memo or not."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.rdu import block_hashes
from tierflow.rdu.kvcache import pack_tokens
from tierflow.workload import trace_text
from tierflow.workload.trace_text import (
    HEAD_TOKENS,
    TAIL_TOKENS,
    TEMPLATE_TOKENS,
    BlockMemo,
    TracePrompt,
    message_ids,
    message_tokens,
    prompt_block_hashes,
    prompt_token_ids,
    prompt_tokens,
)


def _reference(prompt: TracePrompt, block_size: int) -> list[int]:
    return block_hashes(prompt_token_ids(prompt), block_size)


# Lengths around every edge: the empty message (13), a block of words ending exactly at a
# 64- or 512-token edge (tokens - TAIL_TOKENS = 64, 512, 1024, 1536), the prompt itself
# ending at one (64, 512, 1024), and one past each.
LENGTHS = [0, 5, 13, 14, 63, 64, 65, 70, 71, 72, 511, 512, 513, 518, 519, 520, 576, 583, 1024, 1030, 1031, 1032, 1543, 2999, 4096]
IDS = [(), (7,), (7, 8), (7, 8, 9), (7, 8, 9, 10, 11, 12, 13, 14, 15)]  # none, partial coverage, whole coverage, more than needed
SPACES = [0, 1, (1 << 63) - 25]


@pytest.mark.parametrize("block_size", [16, 64, 100, 128, 512, 1024])
@pytest.mark.parametrize("tokens", LENGTHS)
def test_the_hashes_equal_hashing_the_prompts_ids_cold_and_warm(tokens: int, block_size: int) -> None:
    memo = BlockMemo()
    for ids, space in itertools.product(IDS, SPACES):
        prompt = TracePrompt(tokens, ids, row=3, space=space)
        expected = _reference(prompt, block_size)
        assert prompt_block_hashes(prompt, block_size, memo=memo) == expected  # cold (for its space and ids)
        assert prompt_block_hashes(prompt, block_size, memo=memo) == expected  # from the memo


def test_lengths_without_ids() -> None:
    for tokens in LENGTHS:
        prompt = TracePrompt(tokens, (1, 2), row=9, space=4)
        assert prompt_tokens(prompt) == len(prompt_token_ids(prompt)) == max(tokens, TEMPLATE_TOKENS)
        assert message_tokens(prompt) == len(message_ids(prompt))


@pytest.mark.parametrize("tokens", [13, 70, 519, 1100, 2600])
def test_packed_ids_are_the_prompts_ids_over_any_range(tokens: int) -> None:
    prompt = TracePrompt(tokens, (4, 5), row=2, space=6)
    ids = prompt_token_ids(prompt)
    for lo, hi in [(0, tokens), (0, HEAD_TOKENS), (3, 600), (tokens - TAIL_TOKENS - 2, tokens), (512, 1024), (7, 7)]:
        lo, hi = min(lo, tokens), min(hi, tokens)
        assert trace_text._packed_ids(prompt, lo, hi) == pack_tokens(ids[lo:hi])


def test_rows_sharing_a_prefix_hash_only_what_they_do_not_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second row hashes only its own blocks: the memo gives it the shared trunk."""
    hashed: list[int] = []
    chain = trace_text._chain

    def counting(packed: bytes, block_size: int, prev: bytes) -> bytes:
        hashed.append(len(packed) // (4 * block_size))
        return chain(packed, block_size, prev)

    monkeypatch.setattr(trace_text, "_chain", counting)
    memo = BlockMemo()
    first = TracePrompt(3000, (1, 2, 3, 4, 5, 6), row=1, space=0)
    second = TracePrompt(2000, (1, 2, 3, 40), row=2, space=0)  # shares 3 trace blocks = 24 cache blocks
    replica = TracePrompt(2000, (1, 2, 3, 40), row=2, space=1)  # another space shares nothing
    assert prompt_block_hashes(first, 64, memo=memo) == _reference(first, 64)
    assert prompt_block_hashes(second, 64, memo=memo) == _reference(second, 64)
    assert prompt_block_hashes(replica, 64, memo=memo) == _reference(replica, 64)
    assert prompt_block_hashes(second, 64, memo=memo) == _reference(second, 64)
    longer = TracePrompt(2627, (1, 2, 3, 40, 41, 42), row=3, space=0)  # needs all of block 3, which `second` ended in
    assert prompt_block_hashes(longer, 64, memo=memo) == _reference(longer, 64)
    assert prompt_block_hashes(longer, 64, memo=memo) == _reference(longer, 64)
    # `second` again hashes nothing: its words end at 1993, so its 31 full blocks all lie in
    # its 4 trace blocks' words. `longer` hashes from block 3 on; again, only its last block,
    # which holds the template's tail (its words end at 2620, its 41st block at 2624).
    assert hashed == [3000 // 64, 2000 // 64 - 24, 2000 // 64, 2627 // 64 - 24, 1]


def test_the_memo_stays_within_its_capacity_and_exact() -> None:
    memo = BlockMemo(capacity=3)
    prompts = [TracePrompt(1000 + 300 * k, tuple(range(k % 3, k % 3 + 4)), row=k, space=k % 2) for k in range(12)]
    for prompt in prompts * 2:
        assert prompt_block_hashes(prompt, 64, memo=memo) == _reference(prompt, 64)
        assert len(memo) <= 3
    memo.clear()
    assert len(memo) == 0 and prompt_block_hashes(prompts[0], 64, memo=memo) == _reference(prompts[0], 64)
    with pytest.raises(ValueError):
        BlockMemo(capacity=0)
    with pytest.raises(ValueError):
        prompt_block_hashes(prompts[0], 0)


def test_the_process_memo_is_the_default() -> None:
    prompt = TracePrompt(1500, (11, 12, 13), row=1, space=77)
    assert prompt_block_hashes(prompt, 64) == prompt_block_hashes(prompt, 64) == _reference(prompt, 64)


_TRUNKS = [(1, 2, 3, 4, 5, 6, 7), (1, 2, 9, 10, 11, 12, 13), (20, 21, 22, 23, 24, 25, 26), (1 << 63, (1 << 64) - 1, 5, 6, 7, 8, 9)]
_SHARED_MEMO = BlockMemo(capacity=40)  # shared across examples, and small: hits, misses and evictions


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.one_of(st.integers(0, 3600), st.sampled_from(LENGTHS)),
    trunk=st.sampled_from(_TRUNKS),
    shared=st.integers(0, 7),
    own=st.lists(st.integers(0, (1 << 64) - 1), max_size=3),
    row=st.one_of(st.integers(0, 50), st.integers(0, (1 << 63) - 1)),
    space=st.sampled_from([0, 1, 123456789]),
    block_size=st.sampled_from([16, 32, 64, 100, 128, 256]),
)
def test_any_prompt_hashes_as_its_ids_do(tokens: int, trunk: tuple[int, ...], shared: int, own: list[int], row: int, space: int, block_size: int) -> None:
    prompt = TracePrompt(tokens, trunk[:shared] + tuple(own), row=row, space=space)
    assert prompt_block_hashes(prompt, block_size, memo=_SHARED_MEMO) == _reference(prompt, block_size)
