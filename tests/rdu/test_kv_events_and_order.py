"""KV-cache events (what a node tells the router's prefix index) and the eviction order
that keeps reused prefixes alive (issue 17)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from tierflow.rdu import block_hashes
from tierflow.rdu.kvcache import KVAllocation, KVCache
from tierflow.rdu.memory import TransferLedger

BS = 4
BB = 100


def cache(
    hbm_blocks: int = 8,
    ddr_blocks: int = 4,
    *,
    events: bool = True,
    reused_share: float = 0.8,
    event_limit: int = 1 << 20,
) -> KVCache:
    return KVCache(
        block_size=BS, hbm_bytes=hbm_blocks * BB, ddr_bytes=ddr_blocks * BB, copy_bw=1e9, ledger=TransferLedger(),
        events=events, reused_share=reused_share, event_limit=event_limit,
    )  # fmt: skip


def prompt(seed: int, blocks: int) -> list[int]:
    return block_hashes([seed * 1000 + i for i in range(blocks * BS)], BS)


def run(
    kv: KVCache, hashes: list[int], total: int | None = None, model: str = "m"
) -> KVAllocation:
    """One request: allocate, compute (commit) and finish (release)."""
    alloc = kv.allocate(model, BB, hashes, total or len(hashes))
    assert alloc is not None
    kv.commit(alloc)
    kv.release(alloc)
    return alloc


def hbm_has(kv: KVCache, hashes: list[int]) -> list[bool]:
    held = kv.held().get("m", ([], []))
    hbm = set(held[0])
    return [h in hbm for h in hashes]


# -- events -----------------------------------------------------------------------------


def test_events_name_blocks_stored_spilled_restored_and_removed_by_model_and_unsalted_hash() -> (
    None
):
    kv = cache(hbm_blocks=4, ddr_blocks=2)
    a = prompt(1, 4)
    run(kv, a)
    first = kv.drain_events()
    assert not first.lost and first.models["m"].stored == a
    assert kv.drain_events().models == {}  # drained: nothing twice

    run(kv, [], 4)  # a private 4-block request: a's 4 blocks leave HBM, DDR keeps 2
    changes = kv.drain_events().models["m"]
    assert sorted(changes.spilled) == sorted(a[:2]) and sorted(
        changes.removed
    ) == sorted(a[2:])
    assert changes.stored == changes.restored == []

    hit = kv.allocate("m", BB, a, 4)  # a's first two blocks come back from DDR
    assert hit is not None and hit.ddr_hit_blocks == 2
    assert kv.drain_events().models["m"].restored == a[:2]
    kv.commit(hit)
    assert sorted(kv.drain_events().models["m"].stored) == sorted(a[2:])


def test_a_drain_nets_each_hash_to_its_last_change_and_models_stay_apart() -> None:
    kv = cache(hbm_blocks=2, ddr_blocks=0)
    a = prompt(1, 2)
    run(kv, a, model="x")
    run(
        kv, a, model="y"
    )  # same hashes, another model: x's blocks go (no DDR), y's stay
    changes = kv.drain_events().models
    assert (changes["x"].stored, sorted(changes["x"].removed)) == (
        [],
        sorted(a),
    )  # stored, then removed: removed
    assert changes["y"].stored == a and changes["y"].removed == []


def test_events_off_cost_nothing_and_drain_says_lost() -> None:
    kv = cache(events=False)
    run(kv, prompt(1, 3))
    assert kv.drain_events().lost and not kv.events


def test_an_undrained_log_is_bounded_and_the_drain_says_lost() -> None:
    kv = cache(hbm_blocks=64, event_limit=10)
    run(kv, prompt(1, 8))
    run(kv, prompt(2, 8))  # 16 hashes logged > 10: the log is dropped
    assert kv._log == []  # auditing the internals: nothing kept
    drained = kv.drain_events()
    assert drained.lost and drained.models == {}
    run(kv, prompt(3, 2))
    after = kv.drain_events()
    assert not after.lost and after.models["m"].stored == prompt(3, 2)
    held = kv.held()["m"]
    assert (
        sorted(held[0]) == sorted(prompt(1, 8) + prompt(2, 8) + prompt(3, 2))
        and held[1] == []
    )


class EventMirror(RuleBasedStateMachine):
    """Random traffic; a reader that applies every drain (as the router's index does)
    knows exactly the blocks the cache holds, per model and tier."""

    @initialize(hbm_blocks=st.integers(4, 16), ddr_blocks=st.integers(0, 8))
    def setup(self, hbm_blocks: int, ddr_blocks: int) -> None:
        self.kv = cache(hbm_blocks=hbm_blocks, ddr_blocks=ddr_blocks)
        self.live: list[KVAllocation] = []
        self.mirror: dict[str, dict[int, str]] = {}

    @rule(
        model=st.sampled_from(["m1", "m2"]),
        prefix=st.integers(0, 3),
        length=st.integers(1, 5),
        extra=st.integers(0, 2),
    )
    def allocate(self, model: str, prefix: int, length: int, extra: int) -> None:
        alloc = self.kv.allocate(
            model, BB, block_hashes([prefix] * (BS * length), BS), length + extra
        )
        if alloc is not None:
            self.kv.commit(alloc)
            self.live.append(alloc)

    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        if self.live:
            self.kv.release(self.live.pop(i % len(self.live)))

    @rule()
    def drain(self) -> None:
        changes = self.kv.drain_events()
        assert not changes.lost
        for model, c in changes.models.items():
            held = self.mirror.setdefault(model, {})
            for tier, hashes in (
                ("hbm", c.stored),
                ("ddr", c.spilled),
                ("hbm", c.restored),
            ):
                held.update(dict.fromkeys(hashes, tier))
            for h in c.removed:
                held.pop(h, None)

    @invariant()
    def a_reader_of_every_drain_knows_the_cache_exactly(self) -> None:
        self.drain()
        truth = {
            m: {**dict.fromkeys(hbm, "hbm"), **dict.fromkeys(ddr, "ddr")}
            for m, (hbm, ddr) in self.kv.held().items()
        }
        assert {m: h for m, h in self.mirror.items() if h} == truth


TestEventMirror = EventMirror.TestCase
TestEventMirror.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)


# -- eviction order -----------------------------------------------------------------------


def test_a_prefix_hit_before_outlives_a_tail_never_hit_even_one_used_more_recently() -> (
    None
):
    kv = cache(hbm_blocks=8, ddr_blocks=0)
    shared = prompt(1, 2)
    run(kv, shared)
    run(kv, shared)  # hit: the shared prefix is "reused" now
    one_shot = prompt(2, 3)
    run(kv, one_shot)  # later, never hit again
    run(kv, [], 5)  # needs 5 blocks: 3 are free, 2 must go
    # plain LRU would drop the shared prefix (least recently used); it keeps it
    assert hbm_has(kv, shared) == [True, True]
    assert hbm_has(kv, one_shot) == [
        True,
        False,
        False,
    ]  # the one-shot tail goes first, tail before prefix


def test_a_conversations_history_outlives_one_shot_prompts_between_its_turns() -> None:
    kv = cache(hbm_blocks=12, ddr_blocks=0)
    history = prompt(1, 4)
    run(kv, history[:2])
    run(kv, history[:3])  # turn 2 hits turn 1's blocks and adds one
    run(kv, history)  # turn 3
    for seed in range(2, 6):  # one-shot prompts meanwhile, more than the cache holds
        run(kv, prompt(seed, 3))
    turn4 = kv.allocate("m", BB, history, 4)
    assert (
        turn4 is not None and turn4.hit_blocks == 3
    )  # the history read again; turn 3's own tail was never hit


def test_reused_blocks_are_protected_only_up_to_their_share() -> None:
    """A cache full of old reused blocks still keeps room for new ones."""
    kv = cache(hbm_blocks=10, ddr_blocks=0, reused_share=0.5)
    old = prompt(1, 8)
    run(kv, old)
    run(kv, old)  # 8 reused blocks
    fresh = prompt(2, 2)
    run(kv, fresh)  # 2 never-hit blocks: reused hold 80% of what is evictable
    run(
        kv, [], 3
    )  # 3 must go: reused is past its share, so its least recently used go first
    assert hbm_has(kv, fresh) == [True, True]
    assert (
        hbm_has(kv, old) == [True] * 5 + [False] * 3
    )  # the old chain loses its tail, keeps its prefix


def test_ddr_drops_never_hit_blocks_before_reused_ones() -> None:
    kv = cache(hbm_blocks=4, ddr_blocks=4)
    shared = prompt(1, 2)
    run(kv, shared)
    run(kv, shared)  # reused
    run(kv, prompt(2, 2))  # never hit
    run(kv, [], 4)  # everything spills to DDR: 4 blocks, DDR full
    run(
        kv, prompt(3, 2)
    )  # ...stored, then spilled by the next request: two must leave DDR
    run(kv, [], 4)
    held = kv.held()["m"]
    assert set(shared) <= set(held[1])  # the reused pair is still in DDR
    assert not set(prompt(2, 2)) & set(held[0] + held[1])


def test_reused_share_is_checked() -> None:
    with pytest.raises(ValueError, match="reused_share"):
        cache(reused_share=1.5)
