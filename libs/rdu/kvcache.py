"""The KV cache: fixed-size blocks in HBM, a prefix cache over them, spill to DDR.

KV lives in blocks of `block_size` tokens. A prompt's full blocks are named by chained
hashes (`block_hashes`): block i's hash covers block i's token ids *and* block i-1's hash,
so equal hashes mean equal prefixes, and a lookup walks the chain until its first miss.
The router calls `block_hashes` too, to score a node's prefix overlap, so it is
deterministic across processes (BLAKE2b over little-endian uint32 token ids; never
Python's per-process salted `hash`).

Blocks are per model, since one model's KV means nothing to another: a block is keyed by
its hash XOR a salt per model (one int, cheaper than a (model, hash) pair in a dict of
~10^5 blocks), so two models share a key only if 64-bit hashes collide, the same odds a
prefix match already rests on. A request's allocation is
reserved up front for prompt + max_tokens (TensorRT-LLM's "guaranteed no evict" policy:
an admitted request never runs out of KV; the engine preempts one only to make room for
interactive work, its private KV parked in DDR by `park`). Hit blocks are shared and pinned; the rest is
private until the prompt is computed, when its full blocks join the cache (`commit`).

When HBM runs short, unpinned cached blocks are evicted and spill to DDR, itself
bounded (its capacity comes from the profile, through the engine). The order keeps what
will be reused (issue 17): each tier is a segmented LRU. A block starts "once" (stored,
never hit); its first hit makes it "reused", for good. Evictions take the least recently
used "once" block first, so a one-shot prompt's tail goes before a shared system prompt
or a conversation's history that its next turn will read again; the reused segment is
protected up to `reused_share` of a tier's evictable bytes, past which its own least
recently used blocks go first, so a cache full of old conversations still admits new
ones. Within a segment a released request's tail goes before its prefix (a prefix
outlives its extensions; hits are always a chain's prefix, so a reused block's prefix is
reused too). A hit in HBM costs nothing; a hit in DDR costs the DDR -> HBM copy; a spill
costs the HBM -> DDR copy. All copies are charged to the ledger.

KV events (issue 17): with `events=True` the cache logs what changes, per model, as
unsalted block hashes: blocks stored (commit), spilled HBM -> DDR, restored DDR -> HBM
(a DDR hit) and removed (dropped from DDR, or too big for it). The log is a list of
batches (one append per commit, allocation or eviction pass); `drain_events` nets it out
(each hash's last change) for a node host that publishes it, so the router knows which
node holds which blocks exactly, not just the 256 most recent. The log is bounded
(`event_limit` hashes): past it the log is dropped and the next drain says `lost`, and
the reader takes a full `held()` snapshot instead.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b
from itertools import chain, filterfalse, islice, repeat
from typing import Final

import msgspec
import numpy as np

from .memory import TransferLedger

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "block_hashes",
    "pack_tokens",
    "hashes_from_packed",
    "KVAllocation",
    "KVCache",
    "KvChanges",
    "ModelKvChanges",
]

DEFAULT_BLOCK_SIZE: Final = 64
_MERGE_AFTER: Final = 64  # uses logged per list before a merge bounds the log
_ROOT: Final = bytes(8)
# Kinds of KV change, in `ModelKvChanges` field order (a hash's last one wins in a drain).
STORED: Final = 0
SPILLED: Final = 1
RESTORED: Final = 2
REMOVED: Final = 3
DEFAULT_REUSED_SHARE: Final = 0.8
DEFAULT_EVENT_LIMIT: Final = 1 << 20


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


_HASHER: Final = blake2b(digest_size=8)  # copied per block: cheaper than a new one


def hashes_from_packed(packed: bytes, block_size: int) -> list[int]:
    """`block_hashes` of already packed token ids (4 bytes each)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    step = 4 * block_size
    view = memoryview(packed)
    new = _HASHER.copy
    digests: list[bytes] = []
    prev = _ROOT
    for start in range(0, len(packed) - step + 1, step):
        h = new()
        h.update(prev)
        h.update(view[start : start + step])
        prev = h.digest()
        digests.append(prev)
    hashes: list[int] = np.frombuffer(b"".join(digests), dtype="<u8").tolist()
    return hashes


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained 64-bit hashes of each full block of `token_ids` (a partial tail is not hashed).

    Same ids and block size give the same hashes in every process and on every machine.
    """
    return hashes_from_packed(pack_tokens(token_ids), block_size)


class _Block(msgspec.Struct, gc=False):
    """One cached block. A node holds ~10^5 of them: a struct the garbage collector never
    tracks (it can hold no cycle) keeps them out of every collection pass."""

    key: int  # hash ^ model salt
    nbytes: int
    model: str  # whose block (events name it by model and unsalted hash)
    in_hbm: bool = True
    refs: int = 1
    reused: bool = False  # hit at least once since stored: evicted after the never-hit ones


class ModelKvChanges(msgspec.Struct, gc=False):
    """One model's net KV changes since the last drain: each hash is in one list, the
    one of its last change. stored and restored blocks are in HBM now, spilled ones in
    DDR, removed ones nowhere."""

    stored: list[int]
    spilled: list[int]
    restored: list[int]
    removed: list[int]


class KvChanges(msgspec.Struct, gc=False):
    """What `KVCache.drain_events` returns. `lost`: the log overflowed (or events were
    off) since the last drain, so these changes are not all of them: take `held()`."""

    models: dict[str, ModelKvChanges]
    lost: bool = False


# (hashes looked up, (model, total_blocks, max_hit_blocks), the blocks found)
_Lookup = tuple[Sequence[int], tuple[str, int, int | None], list[_Block]]


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
        reused_share: float = DEFAULT_REUSED_SHARE,
        events: bool = False,
        event_limit: int = DEFAULT_EVENT_LIMIT,
    ) -> None:
        """`reused_share`: the share of a tier's evictable bytes that blocks hit before
        keep against never-hit ones (module docstring). `events`: log KV changes for
        `drain_events`, at most `event_limit` hashes between two drains."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not 0.0 <= reused_share <= 1.0:
            raise ValueError(f"reused_share must be in [0, 1], got {reused_share}")
        self.block_size = block_size
        self.hbm_capacity = hbm_bytes
        self.ddr_capacity = ddr_bytes
        self._copy_bw = copy_bw
        self._ledger = ledger
        self._salts: dict[str, int] = {}
        self._last_lookup: _Lookup | None = None
        self._blocks: dict[int, _Block] = {}
        # Unpinned cached blocks in HBM, and every block in DDR, least recently used first;
        # never-hit ("once") and hit ("reused") blocks apart (module docstring).
        self._hbm_once: OrderedDict[int, _Block] = OrderedDict()
        self._hbm_reused: OrderedDict[int, _Block] = OrderedDict()
        self._ddr_once: OrderedDict[int, _Block] = OrderedDict()
        self._ddr_reused: OrderedDict[int, _Block] = OrderedDict()
        self._reused_share = reused_share
        self.hbm_used = 0  # every HBM byte: pinned, cached-unpinned, private
        self.hbm_evictable = 0  # bytes in the two HBM segments
        self.hbm_reused_bytes = 0  # bytes in _hbm_reused
        self.ddr_used = 0  # cached blocks in DDR
        self.ddr_reused_bytes = 0  # bytes in _ddr_reused
        self.ddr_parked = 0  # preempted sequences' KV held in DDR (`park`), out of the cache's room
        # The event log: (kind, model, unsalted hashes) or (kind, None, blocks); None: off.
        self._log: list[tuple[int, str | None, Sequence[object]]] | None = [] if events else None
        self._logged = 0
        self._event_limit = event_limit
        self._lost = False
        self.hbm_blocks = 0
        self.query_tokens = 0
        self.hit_tokens = 0
        self._recent_limit = recent_limit
        # Per model, and over all models (key None): newest first as of the last merge, and
        # the hashes used since, oldest batch first.
        self._recent: dict[str | None, list[int]] = {}
        self._touched: dict[str | None, list[Sequence[int]]] = {}

    # -- inspection --
    @property
    def ddr_blocks(self) -> int:
        return len(self._ddr_once) + len(self._ddr_reused)

    @property
    def usage(self) -> float:
        """Fraction of the HBM KV pool held by running requests (cached blocks count as free)."""
        return (self.hbm_used - self.hbm_evictable) / self.hbm_capacity

    def recent_hashes(self, model: str | None = None) -> list[int]:
        """The `recent_limit` most recently used block hashes, newest first (all models, or one).

        The same list object comes back until a block is used again: do not modify it.
        """
        if self._touched.get(model):
            self._merge(model)
        return self._recent.get(model, [])

    def _touch(self, model: str, hashes: Sequence[int]) -> None:
        """Note a use of these blocks (in order); the lists are merged when asked for.

        Every request uses its prompt's blocks twice (lookup, commit), while snapshots ask
        for the lists about once a second: logging here and merging there is the cheap
        side, and the log is merged early when it grows, to bound it.
        """
        for scope in (model, None):
            log = self._touched.get(scope)
            if log is None:
                log = self._touched[scope] = []
            log.append(hashes)
            if len(log) > _MERGE_AFTER:
                self._merge(scope)

    def _merge(self, scope: str | None) -> None:
        log = self._touched.pop(scope)
        # newest first; dict.fromkeys keeps each hash's first, i.e. latest, position
        fresh = dict.fromkeys(chain.from_iterable(map(reversed, reversed(log))))
        merged = list(fresh)
        room = self._recent_limit - len(merged)
        if room > 0:  # older hashes fill what is left, in C, stopping once the list is full
            merged += islice(filterfalse(fresh.__contains__, self._recent.get(scope, ())), room)
        else:
            del merged[self._recent_limit :]
        self._recent[scope] = merged

    # -- allocation --
    def _salt(self, model: str) -> int:
        salt = self._salts.get(model)
        if salt is None:
            digest = blake2b(model.encode(), digest_size=8, person=b"kv-salt").digest()
            salt = self._salts[model] = int.from_bytes(digest, "little")
        return salt

    def _lookup(
        self, model: str, hashes: Sequence[int], total_blocks: int, max_hit_blocks: int | None
    ) -> list[_Block]:
        # `fits` then `allocate` with the same arguments (a scheduler's check, then its
        # admission) walk the chain once: the walk is kept until the blocks change.
        args = (model, total_blocks, max_hit_blocks)
        last = self._last_lookup
        if last is not None and last[0] is hashes and last[1] == args:
            return last[2]
        limit = min(len(hashes), total_blocks)
        if max_hit_blocks is not None:
            limit = min(limit, max_hit_blocks)
        hits: list[_Block] = []
        get = self._blocks.get
        salt = self._salt(model)
        for h in hashes[:limit]:
            b = get(h ^ salt)
            if b is None:
                break
            hits.append(b)
        self._last_lookup = (hashes, args, hits)
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
        self._last_lookup = None  # the hits become the allocation's; evictions may follow

        alloc = KVAllocation(model, block_bytes)
        ddr_hits = []
        for b in hits:  # pin HBM hits, lift DDR hits out of DDR so spills cannot drop them
            if b.in_hbm:
                if b.refs == 0:
                    if b.reused:
                        del self._hbm_reused[b.key]
                        self.hbm_reused_bytes -= b.nbytes
                    else:
                        del self._hbm_once[b.key]
                    self.hbm_evictable -= b.nbytes
                b.refs += 1
            else:
                if b.reused:
                    del self._ddr_reused[b.key]
                    self.ddr_reused_bytes -= b.nbytes
                else:
                    del self._ddr_once[b.key]
                self.ddr_used -= b.nbytes
                ddr_hits.append(b)
            b.reused = True
        if free < need:
            alloc.seconds += self._evict(need - free)
        fetched = 0
        for b in ddr_hits:
            b.in_hbm = True
            b.refs = 1
            fetched += b.nbytes
        self.hbm_blocks += len(ddr_hits)
        if ddr_hits and self._log is not None:
            self._record(RESTORED, None, ddr_hits)
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
            self._touch(model, hashes[: len(hits)])
        return alloc

    def _evict(self, nbytes: int) -> float:
        """Free at least `nbytes` of HBM by spilling unpinned blocks to DDR, in the
        segmented order of the module docstring (and dropping DDR's blocks in that order)."""
        hbm_once, hbm_reused = self._hbm_once, self._hbm_reused
        ddr_once, ddr_reused, blocks = self._ddr_once, self._ddr_reused, self._blocks
        share = self._reused_share
        ddr_capacity, ddr_used, ddr_reused_bytes = self.ddr_capacity - self.ddr_parked, self.ddr_used, self.ddr_reused_bytes
        evictable, reused_bytes = self.hbm_evictable, self.hbm_reused_bytes
        logging = self._log is not None
        spilled_blocks: list[_Block] = []
        removed_blocks: list[_Block] = []
        freed = spilled = evicted = 0
        while freed < nbytes:
            # the reused segment's LRU goes first only past its share of what is evictable
            if hbm_once and (reused_bytes <= share * evictable or not hbm_reused):
                key, b = hbm_once.popitem(last=False)
            else:
                key, b = hbm_reused.popitem(last=False)
                reused_bytes -= b.nbytes
            size = b.nbytes
            freed += size
            evictable -= size
            evicted += 1
            if size > ddr_capacity:
                del blocks[key]
                if logging:
                    removed_blocks.append(b)
                continue
            while ddr_used + size > ddr_capacity:
                if ddr_once and (ddr_reused_bytes <= share * ddr_used or not ddr_reused):
                    old_key, old = ddr_once.popitem(last=False)
                else:
                    old_key, old = ddr_reused.popitem(last=False)
                    ddr_reused_bytes -= old.nbytes
                ddr_used -= old.nbytes
                del blocks[old_key]
                if logging:
                    removed_blocks.append(old)
            b.in_hbm = False
            if b.reused:
                ddr_reused[key] = b
                ddr_reused_bytes += size
            else:
                ddr_once[key] = b
            ddr_used += size
            spilled += size
            if logging:
                spilled_blocks.append(b)
        self.ddr_used = ddr_used
        self.ddr_reused_bytes = ddr_reused_bytes
        self.hbm_evictable = evictable
        self.hbm_reused_bytes = reused_bytes
        self.hbm_used -= freed
        self.hbm_blocks -= evicted
        if spilled_blocks:  # spilled first: a block spilled and then dropped in this pass is gone
            self._record(SPILLED, None, spilled_blocks)
        if removed_blocks:
            self._record(REMOVED, None, removed_blocks)
        return self._ledger.charge("hbm", "ddr", spilled, self._copy_bw)

    def park(self, nbytes: int) -> float | None:
        """Copy a preempted sequence's private KV (`nbytes`) to DDR and hold it there until
        `unpark`; returns the copy's seconds, or None, changing nothing, if DDR cannot hold
        it beside what is parked already. Cached DDR blocks make room, least useful first."""
        if self.ddr_parked + nbytes > self.ddr_capacity:
            return None
        room = self.ddr_capacity - self.ddr_parked - nbytes
        once, reused = self._ddr_once, self._ddr_reused
        removed: list[_Block] = []
        while self.ddr_used > room:
            if once and (self.ddr_reused_bytes <= self._reused_share * self.ddr_used or not reused):
                key, b = once.popitem(last=False)
            else:
                key, b = reused.popitem(last=False)
                self.ddr_reused_bytes -= b.nbytes
            self.ddr_used -= b.nbytes
            del self._blocks[key]
            removed.append(b)
        if removed:
            self._last_lookup = None
            self._record(REMOVED, None, removed)
        self.ddr_parked += nbytes
        return self._ledger.charge("hbm", "ddr", nbytes, self._copy_bw)

    def unpark(self, nbytes: int, *, restore: bool = True) -> float:
        """Let go of parked KV: copied back to HBM (`restore`, returns the copy's seconds; the
        HBM it lands in is the caller's new allocation) or dropped (its request ended)."""
        self.ddr_parked -= nbytes
        return self._ledger.charge("ddr", "hbm", nbytes, self._copy_bw) if restore else 0.0

    def commit(self, alloc: KVAllocation) -> None:
        """The prompt is computed: its full blocks become shareable cache entries."""
        if alloc.released:
            return
        self._last_lookup = None  # new blocks: a kept walk may stop short
        model, bb = alloc.model, alloc.block_bytes
        blocks, owned = self._blocks, alloc.blocks
        salt = self._salt(model)
        pending = alloc.pending
        keys = [h ^ salt for h in pending]
        if blocks.keys().isdisjoint(keys) and len(set(keys)) == len(keys):  # the usual case, in bulk
            made = list(map(_Block, keys, repeat(bb), repeat(model)))
            blocks.update(zip(keys, made))
            owned += made
            added = pending
        else:
            added = []
            for h, key in zip(pending, keys):
                if key not in blocks:  # else someone cached it meanwhile: ours stays private
                    blocks[key] = b = _Block(key, bb, model)
                    owned.append(b)
                    added.append(h)
        alloc.private_bytes -= bb * len(added)
        self.hbm_blocks += len(added)
        alloc.pending = []
        if added:
            self._touch(model, added)
            if self._log is not None:
                self._record(STORED, model, added)

    def release(self, alloc: KVAllocation) -> None:
        """The request is done: private bytes are freed, shared blocks become evictable."""
        if alloc.released:
            return
        alloc.released = True
        once, reused = self._hbm_once, self._hbm_reused
        freed = freed_reused = 0
        for b in reversed(alloc.blocks):  # tail first, so it is evicted before its prefix
            b.refs -= 1
            if not b.refs:
                if b.reused:
                    reused[b.key] = b
                    freed_reused += b.nbytes
                else:
                    once[b.key] = b
                freed += b.nbytes
        self.hbm_evictable += freed
        self.hbm_reused_bytes += freed_reused
        self.hbm_used -= alloc.private_bytes
        alloc.blocks = []
        alloc.private_bytes = 0

    # -- KV events --
    @property
    def events(self) -> bool:
        """Whether changes are logged for `drain_events`."""
        return self._log is not None

    def _record(self, kind: int, model: str | None, items: Sequence[object]) -> None:
        log = self._log
        if log is None or self._lost:
            return
        self._logged += len(items)
        if self._logged > self._event_limit:  # nobody drains: drop the log, say so at the drain
            log.clear()
            self._lost = True
            return
        log.append((kind, model, items))

    def drain_events(self) -> KvChanges:
        """The net changes since the last drain, per model (each hash under its last
        change), and forget them. `lost` says the log overflowed (or events are off), so
        a reader must replace what it knows with `held()`, taken right after."""
        log = self._log
        if log is None:
            return KvChanges({}, lost=True)
        if not log and not self._lost:  # the usual poll: nothing happened
            return KvChanges({})
        self._log = []
        lost, self._lost, self._logged = self._lost, False, 0
        salts = self._salts
        last: dict[str, dict[int, int]] = {}
        for kind, model, items in log:
            if model is not None:  # unsalted hashes of one model
                net = last.get(model)
                if net is None:
                    net = last[model] = {}
                net.update(zip(items, repeat(kind)))  # type: ignore[arg-type]
            else:  # blocks, of any model
                for b in items:
                    m = b.model  # type: ignore[attr-defined]
                    net = last.get(m)
                    if net is None:
                        net = last[m] = {}
                    net[b.key ^ salts[m]] = kind  # type: ignore[attr-defined]
        models: dict[str, ModelKvChanges] = {}
        for model, net in last.items():
            lists: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
            for h, kind in net.items():
                lists[kind].append(h)
            models[model] = ModelKvChanges(*lists)
        return KvChanges(models, lost=lost)

    def held(self) -> dict[str, tuple[list[int], list[int]]]:
        """Every cached block now, per model: (unsalted hashes in HBM, in DDR). What a
        snapshot says; a walk over every block, so for seconds apart, not per request."""
        salts = self._salts
        out: dict[str, tuple[list[int], list[int]]] = {}
        for b in self._blocks.values():
            m = b.model
            lists = out.get(m)
            if lists is None:
                lists = out[m] = ([], [])
            lists[0 if b.in_hbm else 1].append(b.key ^ salts[m])
        return out
