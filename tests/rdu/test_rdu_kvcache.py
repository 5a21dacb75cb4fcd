"""KV blocks, the prefix cache, spill to DDR, and the hashes the router shares."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tierflow.rdu import block_hashes
from tierflow.rdu.kvcache import KVAllocation, KVCache
from tierflow.rdu.memory import TransferLedger

BS = 4
COPY_BW = 1e9


def cache(
    hbm_blocks: int = 8, ddr_blocks: int = 4, block_bytes: int = 100
) -> tuple[KVCache, TransferLedger]:
    ledger = TransferLedger()
    kv = KVCache(
        block_size=BS,
        hbm_bytes=hbm_blocks * block_bytes,
        ddr_bytes=ddr_blocks * block_bytes,
        copy_bw=COPY_BW,
        ledger=ledger,
        recent_limit=5,
    )
    return kv, ledger


# -- block_hashes ---------------------------------------------------------------------


def test_block_hashes_chain_and_ignore_the_partial_tail() -> None:
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2
    assert block_hashes(list(range(8)) + [99, 98], 4) == a  # same prefix blocks, different tail
    b = block_hashes([0, 1, 2, 3, 4, 5, 6, 99], 4)
    assert b[0] == a[0] and b[1] != a[1]
    # chaining: the same block after a different prefix hashes differently
    assert block_hashes([7, 7, 7, 7, 4, 5, 6, 7], 4)[1] != a[1]
    assert block_hashes([1, 2], 4) == []
    assert all(0 <= h < 2**64 for h in a)


def test_block_hashes_are_the_same_in_every_process() -> None:
    tokens = list(range(1000, 1100))
    code = f"from tierflow.rdu import block_hashes; print(block_hashes({tokens!r}, 16))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {str(block_hashes(tokens, 16))}


def test_block_hashes_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        block_hashes([1, -1], 1)
    with pytest.raises(ValueError):
        block_hashes([1, 2**32], 1)
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)


# -- the cache ------------------------------------------------------------------------


def test_prefix_hits_are_shared_and_free_in_hbm() -> None:
    kv, ledger = cache()
    hashes = block_hashes(list(range(12)), BS)
    first = kv.allocate("m", 100, hashes, 4)
    assert first is not None and first.hit_blocks == 0
    kv.commit(first)
    second = kv.allocate("m", 100, hashes, 4, max_hit_blocks=2)
    assert second is not None and (second.hit_blocks, second.seconds) == (2, 0.0)
    assert kv.hbm_used == 4 * 100 + 2 * 100  # two blocks shared, two private
    assert kv.allocate("other-model", 100, hashes, 1).hit_blocks == 0  # type: ignore[union-attr]
    assert ledger.bytes_moved() == {}
    assert kv.hit_tokens == 2 * BS and kv.query_tokens == 3 * 3 * BS


def test_lru_blocks_spill_to_ddr_and_a_ddr_hit_costs_the_copy_back() -> None:
    kv, ledger = cache(hbm_blocks=4, ddr_blocks=4)
    hashes = block_hashes(list(range(16)), BS)
    a = kv.allocate("m", 100, hashes, 4)
    assert a is not None
    kv.commit(a)
    kv.release(a)
    assert kv.usage == 0.0 and kv.hbm_blocks == 4
    filler = kv.allocate("m", 100, [], 4)  # needs all of HBM: the cached prefix spills
    assert filler is not None and kv.ddr_blocks == 4 and kv.hbm_blocks == 0
    assert filler.seconds == pytest.approx(400 / COPY_BW)
    kv.release(filler)
    again = kv.allocate("m", 100, hashes, 4)
    assert again is not None and again.hit_blocks == 4 and again.ddr_hit_blocks == 4
    assert again.seconds == pytest.approx(400 / COPY_BW)
    assert ledger.bytes_moved() == {"hbm->ddr": 400, "ddr->hbm": 400}


def test_allocation_that_cannot_fit_changes_nothing() -> None:
    kv, _ = cache(hbm_blocks=4)
    held = kv.allocate("m", 100, [], 3)
    assert held is not None
    before = (kv.hbm_used, kv.hbm_evictable, kv.ddr_used, kv.query_tokens)
    assert not kv.fits("m", 100, [], 2)
    assert kv.allocate("m", 100, [], 2) is None
    assert (kv.hbm_used, kv.hbm_evictable, kv.ddr_used, kv.query_tokens) == before


def test_released_tails_are_evicted_before_their_prefix() -> None:
    kv, _ = cache(hbm_blocks=4, ddr_blocks=0)
    hashes = block_hashes(list(range(12)), BS)
    a = kv.allocate("m", 100, hashes, 3)
    kv.commit(a)  # type: ignore[arg-type]
    kv.release(a)  # type: ignore[arg-type]
    kv.allocate("m", 100, [], 2)  # needs one block evicted: it must be the last one
    b = kv.allocate("m", 100, hashes, 2)
    assert b is not None and b.hit_blocks == 2 and b.ddr_hit_blocks == 0


def test_recent_hashes_are_bounded_and_newest_first() -> None:
    kv, _ = cache(hbm_blocks=64)
    h1 = block_hashes(list(range(16)), BS)
    h2 = block_hashes(list(range(100, 116)), BS)
    for hs, model in ((h1, "a"), (h2, "b")):
        alloc = kv.allocate(model, 10, hs, 4)
        kv.commit(alloc)  # type: ignore[arg-type]
    assert kv.recent_hashes("a") == list(reversed(h1))
    assert kv.recent_hashes() == list(reversed(h2)) + [h1[-1]]  # limit 5, across models


class KVMachine(RuleBasedStateMachine):
    """Random allocate / commit / release over a few prompts that share prefixes."""

    @initialize(hbm_blocks=st.integers(4, 24), ddr_blocks=st.integers(0, 12))
    def setup(self, hbm_blocks: int, ddr_blocks: int) -> None:
        self.kv, self.ledger = cache(hbm_blocks=hbm_blocks, ddr_blocks=ddr_blocks)
        self.block_bytes = {"m1": 100, "m2": 150}
        self.live: list[KVAllocation] = []

    @rule(
        model=st.sampled_from(["m1", "m2"]),
        prefix=st.integers(0, 2),
        length=st.integers(1, 5),
        extra=st.integers(0, 3),
        commit=st.booleans(),
    )
    def allocate(self, model: str, prefix: int, length: int, extra: int, commit: bool) -> None:
        tokens = [prefix] * (BS * length)  # prompts share prefixes by construction
        hashes = block_hashes(tokens, BS)
        alloc = self.kv.allocate(model, self.block_bytes[model], hashes, length + extra)
        if alloc is None:
            return
        if commit:
            self.kv.commit(alloc)
        self.live.append(alloc)

    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        if self.live:
            alloc = self.live.pop(i % len(self.live))
            self.kv.commit(alloc)  # committing after release is fine too; order varies
            self.kv.release(alloc)

    @invariant()
    def capacity_is_never_exceeded(self) -> None:
        assert 0 <= self.kv.hbm_used <= self.kv.hbm_capacity
        assert 0 <= self.kv.ddr_used <= self.kv.ddr_capacity
        assert 0.0 <= self.kv.usage <= 1.0

    @invariant()
    def blocks_in_use_stay_in_hbm_and_the_books_balance(self) -> None:
        kv = self.kv
        in_use = sum(a.nbytes for a in self.live)
        blocks = list(kv._blocks.values())  # auditing the internals
        assert all(b.in_hbm for a in self.live for b in a.blocks)
        assert all(b.refs > 0 for a in self.live for b in a.blocks)
        shared_hbm = sum(b.nbytes for b in blocks if b.in_hbm)
        private = sum(a.private_bytes for a in self.live)
        assert kv.hbm_used == shared_hbm + private
        assert kv.ddr_used == sum(b.nbytes for b in blocks if not b.in_hbm)
        assert kv.hbm_used - kv.hbm_evictable <= in_use
        assert kv.hbm_blocks == sum(1 for b in blocks if b.in_hbm)

    @invariant()
    def every_byte_moved_is_charged_in_time(self) -> None:
        moved, seconds = self.ledger.bytes_moved(), self.ledger.seconds()
        for pair, nbytes in moved.items():
            assert seconds[pair] == pytest.approx(nbytes / COPY_BW)


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
