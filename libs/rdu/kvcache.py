"""The KV cache: fixed-size blocks in HBM, a prefix cache over them, spill to DDR.

KV lives in blocks of `block_size` tokens. A prompt's full blocks are named by chained
hashes (`block_hashes`): block i's hash covers block i's token ids *and* block i-1's hash,
so equal hashes mean equal prefixes, and a lookup walks the chain until its first miss.
The router calls `block_hashes` too, to score a node's prefix overlap, so it is
deterministic across processes (BLAKE2b over little-endian uint32 token ids; never
Python's per-process salted `hash`).

Blocks are per model, since one model's KV means nothing to another. A request's allocation is
reserved up front for prompt + max_tokens (TensorRT-LLM's "guaranteed no evict" policy:
admitted requests are never preempted). Hit blocks are shared and pinned; the rest is
private until the prompt is computed, when its full blocks join the cache (`commit`).

When HBM runs short, unpinned cached blocks are evicted in LRU order (a released
request's tail blocks go first, since a prefix outlives its extensions) and spill to
DDR, itself LRU-bounded. A hit in HBM costs nothing; a hit in DDR costs the DDR -> HBM
copy; a spill costs the HBM -> DDR copy. All copies are charged to the ledger.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b
from typing import Final

from .memory import TransferLedger

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "block_hashes",
    "pack_tokens",
    "hashes_from_packed",
    "KVAllocation",
    "KVCache",
]

DEFAULT_BLOCK_SIZE: Final = 64
_ROOT: Final = bytes(8)


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes: the canonical form that gets hashed."""
    try:
        packed = array("I", token_ids)
    except (OverflowError, TypeError):
        raise ValueError("token ids must be integers in [0, 2**32)") from None
    if packed.itemsize != 4:  # pragma: no cover - no mainstream platform
        raise RuntimeError("this platform's array('I') is not 4 bytes wide")
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def hashes_from_packed(packed: bytes, block_size: int) -> list[int]:
    """`block_hashes` of already packed token ids (4 bytes each)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    step = 4 * block_size
    out: list[int] = []
    prev = _ROOT
    for start in range(0, len(packed) - step + 1, step):
        prev = blake2b(prev + packed[start : start + step], digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained 64-bit hashes of each full block of `token_ids` (a partial tail is not hashed).

    Same ids and block size give the same hashes in every process and on every machine.
    """
    return hashes_from_packed(pack_tokens(token_ids), block_size)


class _Block:
    __slots__ = ("key", "nbytes", "in_hbm", "refs")

    def __init__(self, key: tuple[str, int], nbytes: int) -> None:
        self.key = key
        self.nbytes = nbytes
        self.in_hbm = True
        self.refs = 1


class KVAllocation:
    """One request's KV: shared (hit or committed) blocks plus private bytes."""

    __slots__ = (
        "model",
        "block_bytes",
        "blocks",
        "pending",
        "private_bytes",
        "hit_blocks",
        "ddr_hit_blocks",
        "seconds",
        "released",
    )

    def __init__(self, model: str, block_bytes: int) -> None:
        self.model = model
        self.block_bytes = block_bytes
        self.blocks: list[_Block] = []  # pinned shared blocks, prefix order
        self.pending: list[int] = []  # hashes of full prompt blocks computed by this request
        self.private_bytes = 0
        self.hit_blocks = 0
        self.ddr_hit_blocks = 0
        self.seconds = 0.0  # copy time charged by the allocation (DDR hits, spills)
        self.released = False

    @property
    def nbytes(self) -> int:
        return self.private_bytes + self.block_bytes * len(self.blocks)


class KVCache:
    """Paged KV for every model of a node, with a per-model prefix cache."""

    def __init__(
        self,
        *,
        block_size: int,
        hbm_bytes: int,
        ddr_bytes: int,
        copy_bw: float,
        ledger: TransferLedger,
        recent_limit: int = 256,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.hbm_capacity = hbm_bytes
        self.ddr_capacity = ddr_bytes
        self._copy_bw = copy_bw
        self._ledger = ledger
        self._blocks: dict[tuple[str, int], _Block] = {}
        # unpinned cached blocks in HBM, and every block in DDR; oldest first
        self._hbm_lru: OrderedDict[tuple[str, int], _Block] = OrderedDict()
        self._ddr_lru: OrderedDict[tuple[str, int], _Block] = OrderedDict()
        self.hbm_used = 0  # every HBM byte: pinned, cached-unpinned, private
        self.hbm_evictable = 0  # bytes in _hbm_lru
        self.ddr_used = 0
        self.hbm_blocks = 0
        self.query_tokens = 0
        self.hit_tokens = 0
        self._recent_limit = recent_limit
        self._recent: dict[str, OrderedDict[int, None]] = {}  # per model, oldest first
        self._recent_all: OrderedDict[int, None] = OrderedDict()

    # -- inspection --
    @property
    def ddr_blocks(self) -> int:
        return len(self._ddr_lru)

    @property
    def usage(self) -> float:
        """Fraction of the HBM KV pool held by running requests (cached blocks count as free)."""
        return (self.hbm_used - self.hbm_evictable) / self.hbm_capacity

    def recent_hashes(self, model: str | None = None) -> list[int]:
        """The `recent_limit` most recently used block hashes, newest first (all models, or one)."""
        if model is None:
            return list(reversed(self._recent_all))
        return list(reversed(self._recent.get(model, ())))

    def _touch(self, model: str, hashes: Sequence[int]) -> None:
        # Per model and over all models: a touch per prompt block is cheap, and it keeps
        # snapshots (taken as often as requests arrive) free of any merging.
        per_model = self._recent.get(model)
        if per_model is None:
            per_model = self._recent[model] = OrderedDict()
        limit = self._recent_limit
        for od in (per_model, self._recent_all):
            for h in hashes:
                if h in od:
                    od.move_to_end(h)
                else:
                    od[h] = None
            for _ in range(len(od) - limit):
                od.popitem(last=False)

    # -- allocation --
    def _lookup(
        self, model: str, hashes: Sequence[int], total_blocks: int, max_hit_blocks: int | None
    ) -> list[_Block]:
        limit = min(len(hashes), total_blocks)
        if max_hit_blocks is not None:
            limit = min(limit, max_hit_blocks)
        hits: list[_Block] = []
        blocks = self._blocks
        for h in hashes[:limit]:
            b = blocks.get((model, h))
            if b is None:
                break
            hits.append(b)
        return hits

    def _shortfall(
        self, hits: list[_Block], block_bytes: int, total_blocks: int
    ) -> tuple[int, int] | None:
        """(HBM bytes the allocation needs, HBM bytes free now), or None if out of reach."""
        hbm_hit_bytes = 0
        reclaimable_hits = 0
        for b in hits:
            if b.in_hbm:
                hbm_hit_bytes += b.nbytes
                if b.refs == 0:
                    reclaimable_hits += b.nbytes
        need = total_blocks * block_bytes - hbm_hit_bytes
        free = self.hbm_capacity - self.hbm_used
        if free + self.hbm_evictable - reclaimable_hits < need:
            return None
        return need, free

    def fits(
        self,
        model: str,
        block_bytes: int,
        hashes: Sequence[int],
        total_blocks: int,
        *,
        max_hit_blocks: int | None = None,
    ) -> bool:
        """Whether `allocate` with these arguments would succeed now. Changes nothing."""
        hits = self._lookup(model, hashes, total_blocks, max_hit_blocks)
        return self._shortfall(hits, block_bytes, total_blocks) is not None

    def allocate(
        self,
        model: str,
        block_bytes: int,
        hashes: Sequence[int],
        total_blocks: int,
        *,
        max_hit_blocks: int | None = None,
    ) -> KVAllocation | None:
        """Reserve `total_blocks` blocks, reusing the longest cached prefix of `hashes`.

        Returns None, changing nothing, if HBM cannot hold it even after evicting every
        unpinned cached block. `max_hit_blocks` caps reuse (a prompt's last token must be
        computed to produce logits).
        """
        hits = self._lookup(model, hashes, total_blocks, max_hit_blocks)
        shortfall = self._shortfall(hits, block_bytes, total_blocks)
        if shortfall is None:
            return None
        need, free = shortfall

        alloc = KVAllocation(model, block_bytes)
        ddr_hits = []
        for b in hits:  # pin HBM hits, lift DDR hits out of DDR so spills cannot drop them
            if b.in_hbm:
                if b.refs == 0:
                    del self._hbm_lru[b.key]
                    self.hbm_evictable -= b.nbytes
                b.refs += 1
            else:
                del self._ddr_lru[b.key]
                self.ddr_used -= b.nbytes
                ddr_hits.append(b)
        if free < need:
            alloc.seconds += self._evict(need - free)
        fetched = 0
        for b in ddr_hits:
            b.in_hbm = True
            b.refs = 1
            fetched += b.nbytes
        self.hbm_blocks += len(ddr_hits)
        alloc.seconds += self._ledger.charge("ddr", "hbm", fetched, self._copy_bw)
        alloc.blocks = hits
        alloc.hit_blocks = len(hits)
        alloc.ddr_hit_blocks = len(ddr_hits)
        alloc.pending = list(hashes[len(hits) : total_blocks])
        alloc.private_bytes = (total_blocks - len(hits)) * block_bytes
        self.hbm_used += fetched + alloc.private_bytes
        self.query_tokens += len(hashes) * self.block_size
        self.hit_tokens += len(hits) * self.block_size
        if hits:
            self._touch(model, [b.key[1] for b in hits])
        return alloc

    def _evict(self, nbytes: int) -> float:
        """Free at least `nbytes` of HBM by spilling LRU unpinned blocks to DDR."""
        freed = 0
        spilled = 0
        while freed < nbytes:
            key, b = self._hbm_lru.popitem(last=False)
            self.hbm_evictable -= b.nbytes
            self.hbm_used -= b.nbytes
            self.hbm_blocks -= 1
            freed += b.nbytes
            if b.nbytes > self.ddr_capacity:
                del self._blocks[key]
                continue
            while self.ddr_used + b.nbytes > self.ddr_capacity:
                old_key, old = self._ddr_lru.popitem(last=False)
                self.ddr_used -= old.nbytes
                del self._blocks[old_key]
            b.in_hbm = False
            self._ddr_lru[key] = b
            self.ddr_used += b.nbytes
            spilled += b.nbytes
        return self._ledger.charge("hbm", "ddr", spilled, self._copy_bw)

    def commit(self, alloc: KVAllocation) -> None:
        """The prompt is computed: its full blocks become shareable cache entries."""
        if alloc.released:
            return
        model, bb = alloc.model, alloc.block_bytes
        added = []
        for h in alloc.pending:
            key = (model, h)
            if key in self._blocks:  # someone cached it meanwhile: ours stays private
                continue
            b = _Block(key, bb)
            self._blocks[key] = b
            alloc.blocks.append(b)
            alloc.private_bytes -= bb
            added.append(h)
        self.hbm_blocks += len(added)
        alloc.pending = []
        if added:
            self._touch(model, added)

    def release(self, alloc: KVAllocation) -> None:
        """The request is done: private bytes are freed, shared blocks become evictable."""
        if alloc.released:
            return
        alloc.released = True
        for b in reversed(alloc.blocks):  # tail first, so it is evicted before its prefix
            b.refs -= 1
            if b.refs == 0:
                self._hbm_lru[b.key] = b
                self.hbm_evictable += b.nbytes
        self.hbm_used -= alloc.private_bytes
        alloc.blocks = []
        alloc.private_bytes = 0
