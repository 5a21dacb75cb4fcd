"""Fast mode (`token_events=False`) against the step-by-step engine: the same starts,
finishes and snapshots, whatever the traffic and however the engine is driven."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    BundleModel,
    DeploymentConfig,
    EngineEvent,
    EngineRequest,
    EngineSnapshot,
    NodeEngine,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TokenGenerated,
    block_hashes,
    load_profiles,
)
from tierflow.rdu.kvcache import KVCache
from tierflow.rdu.memory import TransferLedger
from tierflow.rdu.timing import DecodeCostModel

SN40L = BUILTIN_PROFILES["sn40l-16"]
# 192 GiB of HBM: the 70B needs most of it, so models take turns and evict each other.
TIGHT = load_profiles({"tight": {"base": "sn40l-16", "hbm_bytes": 12 * 2**30}})["tight"]
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "gpt-oss-20b")
REL = 1e-9
ONE_8B = [BundleModel(BUILTIN_MODELS["llama-3.1-8b"], DeploymentConfig.parse("ss8192-bs4"))]


# -- the step-time sums --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "batch", "context"),
    [
        ("llama-3.1-8b", 7, 5000),  # plain decode, memory-bound
        ("llama-3.1-70b", 7, 5000),  # speculative, memory-bound
        ("llama-3.1-70b", 64, 0),  # speculative, compute-bound until the context grows
        ("llama-3.1-8b", 256, 0),  # compute-bound
    ],
)
@pytest.mark.parametrize("steps", [1, 31, 32, 33, 200, 1500])  # Python loop, NumPy chunks
def test_step_ends_are_the_step_by_step_sums_bit_for_bit(
    model: str, batch: int, context: int, steps: int
) -> None:
    cost = DecodeCostModel(BUILTIN_MODELS[model], SN40L)
    ctx, end = context, 12.345
    expected = []
    for _ in range(steps):
        end += cost.step_seconds(batch, ctx)
        expected.append(end)
        ctx += batch
    assert cost.step_ends(batch, context, 12.345, steps) == expected
    until = expected[steps // 2]
    assert cost.step_ends(batch, context, 12.345, steps, until) == expected[: steps // 2 + 1]
    # `until` between two ends: the run includes the first end past it
    if steps > 1:
        between = (expected[0] + expected[1]) / 2
        assert cost.step_ends(batch, context, 12.345, steps, between) == expected[:2]


# -- both modes under the same calls -------------------------------------------------


def arrivals(
    gaps: st.SearchStrategy[float], tails: st.SearchStrategy[int], outputs: Sequence[int]
) -> st.SearchStrategy[list[tuple]]:
    one = st.tuples(
        gaps,  # to the previous arrival, seconds
        st.sampled_from(MODELS),
        st.integers(0, 3),  # which shared system prompt
        tails,  # the prompt's own tokens after the system prompt
        st.sampled_from(outputs),  # max_tokens (0 = prefill only)
        st.booleans(),  # ignore_eos
        st.one_of(st.none(), st.floats(0, 0.6)),  # cancel this long after arrival
        st.booleans(),  # KV prefilled elsewhere
        st.booleans(),  # the caller sends the block hashes (fast engine only)
    )
    return st.lists(one, min_size=1, max_size=30)


mixed_traffic = arrivals(
    st.one_of(st.floats(0, 0.01), st.floats(0, 0.3)),
    st.integers(1, 700),
    [0, 1, 2, 7, 40, 120, 400, 1000],
)
# long 70B-heavy requests close together: the KV pool runs out and heads wait for it
crowded_traffic = arrivals(st.floats(0, 0.05), st.integers(300, 700), [200, 400, 1000])

scenario = st.fixed_dictionaries(
    {
        "config": st.sampled_from(["ss4096-bs4", "ss4096-bs1-cb2-16", "ss2048-bs2"]),
        "time_slice": st.sampled_from([0.004, 0.05]),
        # 1.6 GB of KV (a few sequences at a time), or weights that do not all fit in HBM
        "kv_cache_fraction": st.sampled_from([0.008, 0.05, 0.2]),
        "max_queue": st.sampled_from([3, 1024]),
        "block_size": st.sampled_from([16, 64]),
        "models": st.sampled_from([MODELS, MODELS[:1], MODELS[:2], MODELS[1:2]]),
    }
)


def make_engine(setup: dict[str, Any], *, fast: bool) -> NodeEngine:
    cfg = DeploymentConfig.parse(setup["config"])
    models = setup["models"]
    return NodeEngine(
        setup.get("profile", TIGHT),
        [BundleModel(BUILTIN_MODELS[m], cfg) for m in models],
        now=0.0,
        ddr_resident=models[:2],  # a third model starts cold
        kv_cache_fraction=setup["kv_cache_fraction"],
        max_queue=setup["max_queue"],
        block_size=setup["block_size"],
        time_slice=setup["time_slice"],
        switch_patience=0.02,
        token_events=not fast,
    )


def actions_of(traffic: list[tuple], setup: dict[str, Any]) -> list[tuple[float, str, Any]]:
    """Submissions and cancellations in time order (a submission first on a tie)."""
    out: list[tuple[float, int, str, Any]] = []
    t = 0.0
    for i, (gap, model, system, tail, max_tokens, ignore_eos, cancel, prefilled, send) in enumerate(
        traffic
    ):
        t += gap
        if model not in setup["models"]:
            model = setup["models"][i % len(setup["models"])]
        prompt = [system] * 200 + list(range(1000, 1000 + tail))
        out.append((t, i, "submit", (model, prompt, max_tokens, ignore_eos, prefilled, send)))
        if cancel is not None:
            out.append((t + cancel, i, "cancel", f"r{i}"))
    out.sort(key=lambda a: (a[0], a[2] == "cancel", a[1]))
    return [(t, kind, (i, payload)) for t, i, kind, payload in out]


class Recorder:
    """Calls one engine and keeps what it answered, and the calls, to replay them."""

    def __init__(self, engine: NodeEngine, block_size: int) -> None:
        self.engine = engine
        self.block_size = block_size
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.events: list[EngineEvent] = []
        self.rejected: list[tuple[str, str]] = []
        self.snapshots: list[EngineSnapshot] = []
        self.token_events = 0
        self.tokens: list[TokenGenerated] = []

    def advance(self, t: float) -> None:
        self.calls.append(("advance", (t,)))
        for ev in self.engine.advance(t):
            if type(ev) is TokenGenerated:
                self.token_events += 1
                self.tokens.append(ev)
            else:
                self.events.append(ev)

    def snapshot(self, t: float) -> None:
        self.calls.append(("snapshot", (t,)))
        self.snapshots.append(self.engine.snapshot(t))

    def cancel(self, request_id: str, t: float) -> None:
        self.calls.append(("cancel", (request_id, t)))
        self.engine.cancel(request_id, t)

    def submit(self, request: EngineRequest, send_hashes: bool, t: float) -> None:
        """`send_hashes`: a fast engine gets the prompt's block hashes with it."""
        self.calls.append(("submit", (request, send_hashes, t)))
        if send_hashes and not self.engine._token_events:
            hashes = block_hashes(request.prompt_token_ids, self.block_size)
            request = msgspec.structs.replace(request, prompt_block_hashes=hashes)
        try:
            self.engine.submit(request, t)
        except RequestRejected as err:
            self.rejected.append((request.request_id, err.code))

    def replay(self, engine: NodeEngine) -> Recorder:
        other = Recorder(engine, self.block_size)
        for name, args in self.calls:
            getattr(other, name)(*args)
        return other


def drive(
    engine: NodeEngine, setup: dict[str, Any], actions: list, driver: str, ticks: Sequence[float]
) -> Recorder:
    """`events` and `replay`: advance to every `next_event_time`, as a live shell does
    (`replay` also moves each arrival to the next step boundary); `coarse`: advance at
    random times and at each action; `lazy`: only at random times, acting in between."""
    rec = Recorder(engine, setup["block_size"])
    pending_ticks = sorted(ticks)
    last = 0.0

    def tick_until(t: float) -> float:
        nonlocal last
        while pending_ticks and pending_ticks[0] < t:
            last = pending_ticks.pop(0)
            rec.advance(last)
        return last

    for t, kind, (i, payload) in actions:
        if driver in ("events", "replay"):
            while (nxt := engine.next_event_time()) is not None and nxt <= t:
                rec.advance(nxt)
            if driver == "replay" and kind == "submit" and nxt is not None:
                t = nxt  # arrive exactly as a step begins
            rec.advance(t)
            rec.snapshot(t)
        elif driver == "coarse":
            tick_until(t)
            rec.advance(t)
            rec.snapshot(t)
        else:
            rec.snapshot(tick_until(t))
        if kind == "cancel":
            rec.cancel(payload, t)
            continue
        model, prompt, max_tokens, ignore_eos, prefilled, send = payload
        request = EngineRequest(
            f"r{i}", model, prompt, max_tokens, seed=i, ignore_eos=ignore_eos, prefilled=prefilled
        )
        rec.submit(request, send, t)
    if driver in ("events", "replay"):
        while (nxt := engine.next_event_time()) is not None:
            rec.advance(nxt)
    else:
        tick_until(math.inf)
        rec.advance(math.inf)
    rec.snapshot(1e6)
    return rec


def same(a: Any, b: Any, path: str = "$") -> None:
    """Equal structs, lists and dicts; floats to `REL` (relative)."""
    if isinstance(a, msgspec.Struct):
        assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
        for field in a.__struct_fields__:
            if field == "itl_buckets":  # fast mode's gaps; token mode has the tokens (test_engine_energy)
                continue
            same(getattr(a, field), getattr(b, field), f"{path}.{field}")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-12), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for key in a:
            same(a[key], b[key], f"{path}[{key!r}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


drivers = st.sampled_from(["events", "replay", "coarse", "lazy"])
tick_times = st.lists(st.floats(0, 6), max_size=12)


@given(mixed_traffic, scenario, drivers, tick_times)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_mode_starts_and_finishes_like_the_step_by_step_engine(
    traffic: list, setup: dict[str, Any], driver: str, ticks: list[float]
) -> None:
    check_both_modes(traffic, setup, driver, ticks)


@given(
    crowded_traffic,
    scenario.map(lambda s: {**s, "kv_cache_fraction": 0.008, "max_queue": 1024}).filter(
        lambda s: len(s["models"]) > 1  # an older waiter of one model holds back the others
    ),
    drivers,
    tick_times,
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_mode_matches_when_the_kv_pool_runs_out(
    traffic: list, setup: dict[str, Any], driver: str, ticks: list[float]
) -> None:
    check_both_modes(traffic, setup, driver, ticks)


@given(mixed_traffic, scenario.map(lambda s: {**s, "profile": BUILTIN_PROFILES["zero"]}), drivers)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_mode_matches_when_everything_takes_no_time(
    traffic: list, setup: dict[str, Any], driver: str
) -> None:
    check_both_modes(traffic, setup, driver, [])


def check_both_modes(
    traffic: list, setup: dict[str, Any], driver: str, ticks: list[float]
) -> None:
    actions = actions_of(traffic, setup)
    slow = drive(make_engine(setup, fast=False), setup, actions, driver, ticks)
    fast = (
        slow.replay(make_engine(setup, fast=True))  # the fast engine woken at every step
        if driver == "replay"
        else drive(make_engine(setup, fast=True), setup, actions, driver, ticks)
    )
    assert fast.token_events == 0
    assert fast.rejected == slow.rejected
    same(fast.events, slow.events)
    same(fast.snapshots, slow.snapshots)
    starts = {e.request_id for e in slow.events if type(e) is RequestStarted}
    finishes = {e.request_id for e in slow.events if type(e) is RequestFinished}
    cancelled = {f"r{i}" for i, a in enumerate(traffic) if a[6] is not None}
    rejected = {rid for rid, _ in slow.rejected}
    assert starts >= finishes and finishes | cancelled | rejected >= {
        f"r{i}" for i in range(len(traffic))
    }


@given(
    st.one_of(mixed_traffic, crowded_traffic),
    st.one_of(scenario, scenario.map(lambda s: {**s, "profile": BUILTIN_PROFILES["zero"]})),
    tick_times,
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_steps_already_due_run_at_once_with_the_same_tokens(
    traffic: list, setup: dict[str, Any], ticks: list[float]
) -> None:
    """A shell that advances now and then (each advance finds many decode steps due, and
    the engine runs them as one piece of work) gets the very events, every token with its
    index, id and time, of one that advances at every step; on the zero profile every
    step is due at once even then."""
    actions = actions_of(traffic, setup)
    stepwise = drive(make_engine(setup, fast=False), setup, actions, "events", ticks)
    coarse = drive(make_engine(setup, fast=False), setup, actions, "coarse", ticks)
    assert coarse.rejected == stepwise.rejected
    same(coarse.events, stepwise.events)
    assert coarse.tokens == stepwise.tokens  # exact: same ids, indices, texts and times
    finished = [e for e in stepwise.events if type(e) is RequestFinished]
    assert len(stepwise.tokens) >= sum(e.completion_tokens for e in finished)


def emulator_like(fast: bool, seconds: float) -> Recorder:
    """Three models under steady load (as loadtest/emulator_speed.py), one arrival at a time."""
    cfg = DeploymentConfig.parse("ss8192-bs1-cb2-64")
    names = ("llama-3.1-8b", "gpt-oss-120b", "llama-3.1-70b")
    engine = NodeEngine(
        SN40L, [BundleModel(BUILTIN_MODELS[n], cfg) for n in names], now=0.0, token_events=not fast
    )
    rec = Recorder(engine, engine.block_size)
    t, i = 0.0, 0
    while t < seconds:
        rec.advance(t)
        rec.snapshot(t)
        prompt = [i % 5] * (150 + 97 * (i % 13)) + list(range(i, i + 40 + 31 * (i % 7)))
        request = EngineRequest(f"r{i}", names[i % 3], prompt, 50 + (i * 37) % 600, ignore_eos=True)
        rec.submit(request, i % 2 == 0, t)
        i += 1
        t += 0.02 + 0.11 * ((i * 7919) % 13) / 13
    rec.advance(math.inf)
    rec.snapshot(1e6)
    return rec


def test_fast_mode_matches_under_steady_multi_model_load() -> None:
    slow, fast = emulator_like(False, 20.0), emulator_like(True, 20.0)
    finished = [e for e in slow.events if type(e) is RequestFinished]
    assert len(finished) > 150 and slow.token_events == sum(e.completion_tokens for e in finished)
    same(fast.events, slow.events)
    same(fast.snapshots, slow.snapshots)


def test_a_lone_request_decodes_as_one_piece_of_work() -> None:
    """Prefill, then all 999 remaining tokens in one run: three wake-ups, not a thousand."""
    wakeups = {}
    for fast in (False, True):
        e = NodeEngine(SN40L, ONE_8B, now=0.0, preload=["llama-3.1-8b"], token_events=not fast)
        e.submit(EngineRequest("a", "llama-3.1-8b", list(range(300)), 1000, ignore_eos=True), 0.0)
        n, events = 0, []
        while (t := e.next_event_time()) is not None:
            events += e.advance(t)
            n += 1
        wakeups[fast] = n
        (fin,) = [ev for ev in events if type(ev) is RequestFinished]
        assert fin.completion_tokens == 1000
    assert wakeups[False] == 1 + 999 + 1  # prefill, each decode step, the idle check
    assert wakeups[True] == 1 + 1 + 1


def test_an_arrival_cuts_a_run_at_the_next_step() -> None:
    """A second request arriving mid-run joins the batch at the next step boundary."""
    starts = []
    for fast in (False, True):
        e = NodeEngine(SN40L, ONE_8B, now=0.0, preload=["llama-3.1-8b"], token_events=not fast)
        e.submit(EngineRequest("a", "llama-3.1-8b", list(range(300)), 500, ignore_eos=True), 0.0)
        events = e.advance(0.1)
        busy_until = e.snapshot(0.1).busy_until
        e.submit(EngineRequest("b", "llama-3.1-8b", list(range(50)), 5, ignore_eos=True), 0.1)
        events += e.advance(math.inf)
        (b,) = [ev for ev in events if type(ev) is RequestStarted and ev.request_id == "b"]
        assert b.time == busy_until  # the end of the step under way at 0.1
        starts.append(b)
    assert starts[0] == starts[1]


def test_supplied_block_hashes_are_checked_for_length() -> None:
    e = NodeEngine(SN40L, ONE_8B, now=0.0, token_events=False)
    prompt = list(range(200))  # three full 64-token blocks
    with pytest.raises(RequestRejected) as err:
        e.submit(EngineRequest("a", "llama-3.1-8b", prompt, 4, prompt_block_hashes=[1, 2]), 0.0)
    assert err.value.code == "invalid_request" and "3 full blocks of 64" in err.value.message
    hashes = block_hashes(prompt, 64)
    e.submit(EngineRequest("a", "llama-3.1-8b", prompt, 4, prompt_block_hashes=hashes), 0.0)
    assert [type(ev) for ev in e.advance(math.inf)] == [RequestStarted, RequestFinished]


def test_snapshots_reuse_unchanged_hash_lists() -> None:
    """Heartbeats snapshot every node every second: an idle node's lists are not rebuilt."""
    e = NodeEngine(SN40L, ONE_8B, now=0.0, token_events=False)
    e.submit(EngineRequest("a", "llama-3.1-8b", list(range(200)), 4), 0.0)
    e.advance(math.inf)
    first, second = e.snapshot(10.0), e.snapshot(11.0)
    assert first.recent_prefix_hashes == block_hashes(list(range(200)), 64)[::-1]
    assert second.recent_prefix_hashes is first.recent_prefix_hashes
    assert second.models[0].recent_prefix_hashes is first.models[0].recent_prefix_hashes


def test_an_arrival_exactly_at_a_step_boundary_waits_for_the_next_one() -> None:
    """The step beginning at `t` began before a request arriving at `t` was handed in."""
    slow = NodeEngine(SN40L, ONE_8B, now=0.0, preload=["llama-3.1-8b"])
    fast = NodeEngine(SN40L, ONE_8B, now=0.0, preload=["llama-3.1-8b"], token_events=False)
    for e in (slow, fast):
        e.submit(EngineRequest("a", "llama-3.1-8b", list(range(300)), 500, ignore_eos=True), 0.0)
    for _ in range(40):  # into the decode: `at` is a step boundary inside the fast engine's run
        slow.advance(slow.next_event_time())  # type: ignore[arg-type]
    at = slow.next_event_time()
    assert at is not None
    slow.advance(at)
    fast.advance(at)
    assert at < slow.next_event_time() < fast.next_event_time()  # type: ignore[operator]
    started = []
    for e in (slow, fast):
        e.submit(EngineRequest("b", "llama-3.1-8b", list(range(50)), 5, ignore_eos=True), at)
        events = e.advance(math.inf)
        (b,) = [ev for ev in events if type(ev) is RequestStarted and ev.request_id == "b"]
        started.append(b)
    assert started[0] == started[1] and started[0].time > at


def test_a_head_waiting_for_kv_does_not_break_up_the_run() -> None:
    """Two long 70B requests fill the KV pool; a third waits without costing a wake-up a step."""
    bundle = [BundleModel(BUILTIN_MODELS["llama-3.1-70b"], DeploymentConfig.parse("ss4096-bs4"))]
    e = NodeEngine(TIGHT, bundle, now=0.0, kv_cache_fraction=0.008, token_events=False)
    for i in range(3):
        prompt = list(range(i * 1000, i * 1000 + 900))
        e.submit(EngineRequest(f"r{i}", "llama-3.1-70b", prompt, 1000, ignore_eos=True), 0.0)
    kinds = []
    while (t := e.next_event_time()) is not None:
        events = e.advance(t)
        kinds.append([(type(ev).__name__, ev.request_id) for ev in events])
    # load; prefill of r0 and r1; one run of 999 steps to their finish; r2's prefill; its run
    assert kinds == [
        [],
        [("RequestStarted", "r0"), ("RequestStarted", "r1")],
        [],
        [("RequestFinished", "r0"), ("RequestFinished", "r1"), ("RequestStarted", "r2")],
        [],
        [("RequestFinished", "r2")],
    ]


# -- the prefix cache's recency lists, merged lazily ----------------------------------


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]), st.lists(st.integers(0, 40), max_size=6, unique=True)
        ),
        max_size=200,
    ),
    st.integers(1, 12),
    st.sets(st.integers(0, 199)),
)
@settings(max_examples=200, deadline=None)
def test_recent_hashes_match_an_eager_lru(
    touches: list[tuple[str, list[int]]], limit: int, asked_at: set[int]
) -> None:
    """Logging uses and merging when asked gives what moving each hash to the front would."""
    kv = KVCache(
        block_size=4,
        hbm_bytes=1,
        ddr_bytes=1,
        copy_bw=1.0,
        ledger=TransferLedger(),
        recent_limit=limit,
    )
    eager: dict[str | None, OrderedDict[int, None]] = {}
    for i, (model, hashes) in enumerate(touches):
        kv._touch(model, hashes)
        for scope in (model, None):
            lru = eager.setdefault(scope, OrderedDict())
            for h in hashes:
                lru.pop(h, None)
                lru[h] = None
            while len(lru) > limit:
                lru.popitem(last=False)
        if i in asked_at:  # merges at random moments, and the log overflowing, change nothing
            for scope in ("a", "b", None):
                assert kv.recent_hashes(scope) == list(reversed(eager.get(scope, ())))
    for scope in ("a", "b", None):
        assert kv.recent_hashes(scope) == list(reversed(eager.get(scope, ())))


def small_cache(hbm_blocks: int, ddr_blocks: int) -> KVCache:
    return KVCache(
        block_size=4,
        hbm_bytes=hbm_blocks * 100,
        ddr_bytes=ddr_blocks * 100,
        copy_bw=1e9,
        ledger=TransferLedger(),
    )


def test_a_kept_lookup_sees_blocks_cached_after_it() -> None:
    """`fits` keeps its walk for the `allocate` that follows; a commit in between adds blocks."""
    kv = small_cache(hbm_blocks=16, ddr_blocks=0)
    first = kv.allocate("m", 100, block_hashes(list(range(12)), 4), 3)  # computing the prompt
    assert first is not None
    hashes = block_hashes(list(range(12)), 4)  # the same prompt again
    assert kv.fits("m", 100, hashes, 3, max_hit_blocks=2)  # nothing cached yet
    kv.commit(first)
    again = kv.allocate("m", 100, hashes, 3, max_hit_blocks=2)
    assert again is not None and again.hit_blocks == 2


def test_allocations_never_share_a_kept_lookup() -> None:
    """Two requests with the same prompt: the second allocation walks the chain anew, so
    the blocks the second commits are not released with the first."""
    kv = small_cache(hbm_blocks=16, ddr_blocks=0)
    hashes = block_hashes(list(range(16)), 4)
    cached = kv.allocate("m", 100, hashes[:2], 2)  # the first two blocks get cached
    assert cached is not None
    kv.commit(cached)
    kv.release(cached)
    assert kv.fits("m", 100, hashes, 4)
    a = kv.allocate("m", 100, hashes, 4)
    b = kv.allocate("m", 100, hashes, 4)
    assert a is not None and b is not None and a.hit_blocks == b.hit_blocks == 2
    kv.commit(b)  # b caches blocks 2 and 3 and holds them
    kv.release(a)
    assert kv.hbm_evictable == 0  # everything cached is still held by b
