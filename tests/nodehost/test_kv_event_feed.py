"""A node's KV-event feed: numbered, split, snapshots when due; read back by the router's index."""

from __future__ import annotations

from tierflow.contracts import messages
from tierflow.nodehost.kv_events import KvEventFeed
from tierflow.placement.prefix_index import PrefixIndex
from tierflow.rdu import block_hashes
from tierflow.rdu.kvcache import KVCache, KvChanges
from tierflow.rdu.memory import TransferLedger

BS = 4
BB = 100


class CacheSource:
    """A KV cache standing for the engine (the feed reads only these two methods)."""

    def __init__(
        self, hbm_blocks: int = 64, ddr_blocks: int = 16, *, event_limit: int = 1 << 20
    ) -> None:
        self.kv = KVCache(block_size=BS, hbm_bytes=hbm_blocks * BB, ddr_bytes=ddr_blocks * BB, copy_bw=1e9, ledger=TransferLedger(),
                          events=True, event_limit=event_limit)  # fmt: skip

    def drain_kv_events(self) -> KvChanges:
        return self.kv.drain_events()

    def kv_held(self) -> dict[str, tuple[list[int], list[int]]]:
        return self.kv.held()

    def serve(self, seed: int, blocks: int, model: str = "m") -> list[int]:
        hashes = block_hashes([seed * 10_000 + i for i in range(blocks * BS)], BS)
        alloc = self.kv.allocate(model, BB, hashes, blocks)
        assert alloc is not None
        self.kv.commit(alloc)
        self.kv.release(alloc)
        return hashes


def wire(batch: list[messages.KvEvents]) -> list[messages.KvEvents]:
    """Through JSON and back, bounds checked, as a router receives them."""
    return [
        messages.kv_events_decoder.decode(messages.encoder.encode(m)) for m in batch
    ]


def test_the_feed_starts_with_a_snapshot_then_sends_numbered_changes_only_when_there_are_some() -> (
    None
):
    source, feed = CacheSource(), KvEventFeed("n1", 7.0, snapshot_every=0)
    a = source.serve(1, 3)
    first = wire(feed.poll(source, 0.0))
    assert [(m.seq, m.snapshot, m.started_at) for m in first] == [(1, True, 7.0)]
    assert first[0].models[0].stored == a
    assert feed.poll(source, 0.05) == []
    b = source.serve(2, 2)
    second = wire(feed.poll(source, 0.1))
    assert [(m.seq, m.snapshot) for m in second] == [(2, False)] and second[0].models[
        0
    ].stored == b


def test_big_batches_are_split_and_a_split_snapshot_continues_as_changes() -> None:
    source, feed = (
        CacheSource(hbm_blocks=64),
        KvEventFeed("n1", 0.0, snapshot_every=0, max_hashes=10),
    )
    source.serve(1, 25, model="x")
    source.serve(2, 5, model="y")
    batch = wire(feed.poll(source, 0.0))
    assert [(m.seq, m.snapshot) for m in batch] == [(1, True), (2, False), (3, False)]
    assert all(
        sum(len(x.stored) + len(x.spilled) for x in m.models) <= 10 for m in batch
    )
    index = PrefixIndex()
    assert not any(index.apply(m, 0.0) for m in batch)
    held = source.kv.held()
    assert set(index.holder("n1", "x") or ()) == set(held["x"][0]) and set(
        index.holder("n1", "y") or ()
    ) == set(held["y"][0])


def test_snapshots_on_request_at_most_once_per_gap_periodically_and_after_a_lost_log() -> (
    None
):
    source, feed = (
        CacheSource(event_limit=8),
        KvEventFeed("n1", 0.0, snapshot_every=30.0, min_snapshot_gap=1.0),
    )
    assert feed.poll(source, 0.0)[0].snapshot
    feed.request_snapshot()
    assert feed.poll(source, 0.5) == []  # asked within the gap: not yet
    assert feed.poll(source, 1.0)[0].snapshot
    source.serve(1, 2)
    assert not feed.poll(source, 2.0)[0].snapshot
    assert feed.poll(source, 31.0)[0].snapshot  # periodic
    source.serve(2, 9)  # 9 hashes > the log's 8: lost
    lost = feed.poll(source, 32.0)
    assert lost[0].snapshot and len(lost[0].models[0].stored) == 11
    assert feed.snapshots == 4


def test_a_router_index_fed_by_the_feed_mirrors_the_cache_through_spills_and_drops() -> (
    None
):
    source, feed = (
        CacheSource(hbm_blocks=8, ddr_blocks=4),
        KvEventFeed("n1", 0.0, snapshot_every=0),
    )
    index = PrefixIndex()
    t = 0.0
    for seed in range(12):
        source.serve(seed % 5, 2 + seed % 3, model="ab"[seed % 2])
        t += 0.05
        for m in wire(feed.poll(source, t)):
            assert not index.apply(m, t)
    for model, (hbm, ddr) in source.kv.held().items():
        assert index.holder("n1", model) == {
            **dict.fromkeys(hbm, False),
            **dict.fromkeys(ddr, True),
        }
