"""Where the node's queue forms: classes in strict priority, tenants by weighted fair share
(`tierflow.rdu.fairness`), starvation protection and preemption, in virtual time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierflow.placement.classes import CLASSES
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
    itl,
    load_profiles,
)
from tierflow.rdu.fairness import CLASS_NAMES

SN40L = BUILTIN_PROFILES["sn40l-16"]
TIGHT = load_profiles({"tight": {"base": "sn40l-16", "hbm_bytes": 12 * 2**30}})["tight"]
M8B = "llama-3.1-8b"


def engine(*, batch: int = 4, fast: bool = False, **kw: Any) -> NodeEngine:
    bundle = [BundleModel(BUILTIN_MODELS[M8B], DeploymentConfig.parse(f"ss4096-bs{batch}"))]
    return NodeEngine(SN40L, bundle, now=0.0, preload=[M8B], token_events=not fast, **kw)


def request(rid: str, tenant: str = "", cls: str = "standard", weight: float = 1.0, *, prompt: int = 200, out: int = 100, seed: int = 0) -> EngineRequest:
    base = sum(map(ord, rid)) * 7919 % 50_000
    return EngineRequest(
        rid, M8B, list(range(base, base + prompt)), out, seed=seed, ignore_eos=True,
        request_class=cls, tenant=tenant, tenant_weight=weight,
    )  # fmt: skip


@dataclass
class Loop:
    """A closed-loop client: keeps `depth` requests on the node, one more as each ends."""

    tenant: str
    depth: int
    cls: str = "standard"
    weight: float = 1.0
    out: int = 100
    until: float = math.inf  # sends nothing new after this
    sent: int = 0

    def next(self) -> EngineRequest:
        self.sent += 1
        return request(f"{self.tenant}-{self.sent}", self.tenant, self.cls, self.weight, out=self.out)


@dataclass
class Run:
    events: list[EngineEvent] = field(default_factory=list)
    arrival: dict[str, float] = field(default_factory=dict)
    tenant: dict[str, str] = field(default_factory=dict)
    cls: dict[str, str] = field(default_factory=dict)

    def starts(self) -> dict[str, RequestStarted]:
        return {e.request_id: e for e in self.events if type(e) is RequestStarted}

    def finishes(self) -> dict[str, RequestFinished]:
        return {e.request_id: e for e in self.events if type(e) is RequestFinished}

    def tokens(self, rid: str) -> list[tuple[int, int, float]]:
        return [(e.index, e.token_id, e.time) for e in self.events if type(e) is TokenGenerated and e.request_id == rid]


def drive(e: NodeEngine, *, until: float, loops: Sequence[Loop] = (), arrivals: Iterable[tuple[float, EngineRequest]] = (), joins: Sequence[tuple[float, Loop]] = ()) -> Run:
    """Advance `e` event by event to `until` (then to the end of what it holds). `loops`
    send their first requests at 0, `joins` at their time; each answers a finish of one
    of its requests with a new one at once (until `until`)."""
    run = Run()
    pending: list[tuple[float, EngineRequest | Loop]] = sorted([*arrivals, *joins, *((0.0, loop) for loop in loops)], key=lambda a: a[0])
    owner: dict[str, Loop] = {}

    def submit(req: EngineRequest, t: float, loop: Loop | None = None) -> None:
        e.submit(req, t)
        run.arrival[req.request_id], run.tenant[req.request_id], run.cls[req.request_id] = t, req.tenant, req.request_class
        if loop is not None:
            owner[req.request_id] = loop

    i = 0
    while True:
        nxt = e.next_event_time()
        arrival = pending[i][0] if i < len(pending) else math.inf
        if nxt is None and arrival == math.inf:
            return run
        if arrival <= (nxt if nxt is not None else math.inf):
            events = e.advance(arrival)
            run.events += events
            while i < len(pending) and pending[i][0] == arrival:
                what = pending[i][1]
                if isinstance(what, Loop):
                    for _ in range(what.depth):
                        submit(what.next(), arrival, what)
                else:
                    submit(what, arrival)
                i += 1
        else:
            events = e.advance(nxt)  # type: ignore[arg-type]
            run.events += events
        for ev in events:
            if type(ev) is RequestFinished and (loop := owner.pop(ev.request_id, None)) is not None:
                if ev.time < min(until, loop.until):
                    submit(loop.next(), ev.time, loop)


def queue_times(run: Run, tenant: str, after: float = 0.0) -> list[float]:
    return [s.queue_time for rid, s in run.starts().items() if run.tenant[rid] == tenant and run.arrival[rid] >= after]


def test_the_engine_knows_the_router_classes_in_their_order() -> None:
    assert CLASS_NAMES == CLASSES


def test_a_bad_class_or_weight_is_refused_with_what_to_send() -> None:
    e = engine()
    with pytest.raises(RequestRejected) as err:
        e.submit(request("a", cls="urgent"), 0.0)
    assert err.value.code == "invalid_request" and "interactive, standard, batch" in err.value.message
    for weight in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(RequestRejected) as err:
            e.submit(request("b", weight=weight), 0.0)
        assert err.value.code == "invalid_request" and "tenant_weight" in err.value.message


# -- tenants within a class ----------------------------------------------------------


def steady_beside_flood(tenants: tuple[str, str]) -> tuple[Run, NodeEngine]:
    """A flood keeping its batch full and 24 more queued; a steady client sending one
    request every 1.5 s. `tenants`: their names (equal names: one tenant, FCFS)."""
    e = engine(fast=True)
    flood = Loop(tenants[0], depth=4 + 24, until=40.0)
    steady = [(1.0 + 1.5 * k, request(f"s{k}", tenants[1])) for k in range(24)]
    return drive(e, until=40.0, loops=[flood], arrivals=steady), e


def test_a_steady_tenant_starts_within_a_batch_turn_beside_a_flood() -> None:
    fair, _ = steady_beside_flood(("flood", "steady"))
    fcfs, _ = steady_beside_flood(("", ""))  # one tenant: first come, first served
    steady_fair = [fair.starts()[f"s{k}"].queue_time for k in range(24)]
    steady_fcfs = [fcfs.starts()[f"s{k}"].queue_time for k in range(24)]
    # a batch turn: the longest gap between two admissions while the flood runs
    times = sorted(s.time for s in fair.starts().values() if 5.0 < s.time < 38.0)
    turn = max(b - a for a, b in zip(times, times[1:]))
    assert max(steady_fair) <= turn + 1e-9
    assert sum(steady_fair) < 0.1 * sum(steady_fcfs)  # FCFS: behind the flood's 24 (3 s and more)
    assert min(steady_fcfs[4:]) > 5 * turn


def backlogged(weights: tuple[float, float], *, late: float = 0.0, until: float = 60.0) -> Run:
    """Two tenants each keeping 28 requests on the node; the second from `late` on."""
    a = Loop("a", depth=28, weight=weights[0], until=until)
    b = Loop("b", depth=28, weight=weights[1], until=until)
    return drive(engine(fast=True), until=until, joins=[(0.0, a), (late, b)])


def started_by_tenant(run: Run, start: float, end: float) -> Counter[str]:
    return Counter(run.tenant[rid] for rid, s in run.starts().items() if start <= s.time < end)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0), (2.0, 1.0)])
def test_backlogged_tenants_share_by_weight(weights: tuple[float, float]) -> None:
    run = backlogged(weights)
    n = started_by_tenant(run, 10.0, 55.0)  # same-shaped requests: starts are service
    assert n["a"] + n["b"] > 200
    assert n["b"] / n["a"] == pytest.approx(weights[1] / weights[0], rel=0.1)


def test_a_tenant_that_was_idle_banks_no_credit() -> None:
    """b arrives after a has run alone for 30 s: from then on they split evenly, b does not
    take the node until it has caught up with a's 30 s."""
    run = backlogged((1.0, 1.0), late=30.0, until=70.0)
    n = started_by_tenant(run, 31.0, 65.0)
    assert n["b"] / n["a"] == pytest.approx(1.0, rel=0.1)
    first_b = min(s.time for rid, s in run.starts().items() if run.tenant[rid] == "b")
    assert first_b < 31.0


def test_one_tenant_is_served_first_come_first_served() -> None:
    e = engine(batch=2, fast=True)
    arrivals = [(0.01 * k, request(f"r{k}", "t")) for k in range(12)]
    run = drive(e, until=math.inf, arrivals=arrivals)
    order = sorted(run.starts().values(), key=lambda s: s.time)
    assert [s.request_id for s in order] == [f"r{k}" for k in range(12)]


# -- classes -------------------------------------------------------------------------


def test_interactive_goes_before_batch_that_waited_longer() -> None:
    e = engine(preemption=False)
    arrivals = [(0.0, request(f"b{k}", "bulk", "batch")) for k in range(12)]
    arrivals += [(0.05, request(f"i{k}", "chat", "interactive", out=20)) for k in range(4)]
    run = drive(e, until=math.inf, arrivals=arrivals)
    order = [s.request_id for s in sorted(run.starts().values(), key=lambda s: (s.time, s.request_id))]
    assert order[:4] == ["b0", "b1", "b2", "b3"]  # the batch had the node to itself
    assert sorted(order[4:8]) == ["i0", "i1", "i2", "i3"]  # next slots, ahead of b4..b11


@given(
    st.lists(
        st.tuples(st.floats(0, 0.2), st.sampled_from(CLASS_NAMES), st.sampled_from(["x", "y", "z"]), st.sampled_from([5, 40, 200])),
        min_size=1, max_size=40,
    ),  # fmt: skip
    st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_request_starts_while_a_better_class_waits(traffic: list[tuple[float, str, str, int]], fast: bool) -> None:
    """Strict priority (starvation protection out of reach): whenever a request starts,
    no request of a better class that had arrived is still waiting."""
    e = engine(fast=fast, preemption=False, starvation_s=1e6)
    t, arrivals = 0.0, []
    for k, (gap, cls, tenant, out) in enumerate(traffic):
        t += gap
        arrivals.append((t, request(f"r{k}", tenant, cls, out=out)))
    run = drive(e, until=math.inf, arrivals=arrivals)
    starts = run.starts()
    assert len(starts) == len(traffic)
    rank = {c: i for i, c in enumerate(CLASS_NAMES)}
    for rid, s in starts.items():
        for other, o in starts.items():
            if rank[run.cls[other]] < rank[run.cls[rid]] and run.arrival[other] <= s.time:
                assert o.time <= s.time, f"{rid} ({run.cls[rid]}) started at {s.time} while {other} ({run.cls[other]}) waited"


def test_a_batch_request_is_not_starved_past_the_bound() -> None:
    """An interactive flood keeps the node full; a batch request arriving at 1 s starts once
    it has waited `starvation_s` (within an admission's turn), not when the flood ends."""
    for bound, expect_by in ((2.0, 3.5), (1e6, None)):
        e = engine(fast=True, preemption=False, starvation_s=bound)
        flood = Loop("chat", depth=4 + 16, cls="interactive", until=20.0)
        run = drive(e, until=20.0, loops=[flood], arrivals=[(1.0, request("late", "bulk", "batch"))])
        s = run.starts()["late"]
        last_flood = max(f.time for rid, f in run.starts().items() if rid != "late")
        if expect_by is None:
            assert s.time > 19.0 and s.time >= last_flood - 1.0  # behind the whole flood
        else:
            assert bound <= s.queue_time and s.time <= expect_by


def two_models(b_class: str) -> Run:
    """Model A (8B) decodes a batch-class backlog; model B (20B) gets a request every 0.5 s."""
    cfg = DeploymentConfig.parse("ss4096-bs4")
    names = (M8B, "gpt-oss-20b")
    e = NodeEngine(SN40L, [BundleModel(BUILTIN_MODELS[n], cfg) for n in names], now=0.0, preload=list(names))
    bulk = Loop("bulk", depth=8, cls="batch", out=400, until=5.0)
    arrivals = [(0.2 + 0.5 * k, msgspec.structs.replace(request(f"i{k}", "chat", b_class, out=60), model=names[1])) for k in range(8)]
    return drive(e, until=5.0, loops=[bulk], arrivals=arrivals)


def test_the_model_with_interactive_work_runs_before_one_with_batch_work() -> None:
    """Time slices go to the model with work of the best class: B's interactive requests
    decode without waiting out A's batch slices (50 ms each), which they do when B's
    requests are of A's class."""
    for b_class, fast_enough in (("interactive", True), ("batch", False)):
        run = two_models(b_class)
        worst = 0.0
        for k in range(8):
            toks = run.tokens(f"i{k}")
            worst = max(worst, max(b - a for (_, _, a), (_, _, b) in zip(toks, toks[1:])))
        assert (worst < 0.02) is fast_enough, (b_class, worst)


# -- preemption ----------------------------------------------------------------------


def preemption_case(fast: bool, *, preemption: bool = True) -> tuple[Run, NodeEngine]:
    """Four long batch sequences fill the batch; an interactive request arrives at 0.4 s."""
    e = engine(fast=fast, preemption=preemption)
    arrivals = [(0.01 * k, request(f"b{k}", "bulk", "batch", out=2000, seed=k)) for k in range(4)]
    arrivals.append((0.4, request("i", "chat", "interactive", out=100)))
    return drive(e, until=math.inf, arrivals=arrivals), e


def test_interactive_work_preempts_the_newest_batch_sequence() -> None:
    run, e = preemption_case(False)
    waited, _ = preemption_case(False, preemption=False)
    i = run.starts()["i"]
    assert i.queue_time < 0.05  # a step, the KV copy out, then its prefill
    assert waited.starts()["i"].queue_time > 1.0  # without preemption: until a sequence ends
    snap = e.snapshot(100.0)
    assert snap.preemptions == 1 and snap.models[0].preemptions == 1
    assert snap.bytes_moved.get("hbm->ddr", 0) > 0 and snap.bytes_moved.get("ddr->hbm", 0) > 0
    # b3 started last, so it left the batch; it resumed after i and finished whole
    b3 = run.tokens("b3")
    gap = max(b - a for (_, _, a), (_, _, b) in zip(b3, b3[1:]))
    assert gap > 0.05
    assert run.finishes()["b3"].completion_tokens == 2000
    for k in range(3):  # the others never left
        toks = run.tokens(f"b{k}")
        assert max(b - a for (_, _, a), (_, _, b) in zip(toks, toks[1:])) < 0.05


def test_a_preempted_sequence_resumes_with_the_same_tokens() -> None:
    run, _ = preemption_case(False)
    alone, _ = preemption_case(False, preemption=False)
    for k in range(4):
        got = [(i, tok) for i, tok, _ in run.tokens(f"b{k}")]
        assert got == [(i, tok) for i, tok, _ in alone.tokens(f"b{k}")]
        assert [x[0] for x in got] == list(range(2000))


def test_preemption_is_the_same_in_fast_mode() -> None:
    slow, e_slow = preemption_case(False)
    fast, e_fast = preemption_case(True)
    assert [ev for ev in slow.events if type(ev) is not TokenGenerated] == [
        msgspec.structs.replace(ev, itl_buckets=()) if type(ev) is RequestFinished else ev for ev in fast.events
    ]
    same_snapshots(e_slow.snapshot(100.0), e_fast.snapshot(100.0))
    # fast mode's gaps between tokens, the preemption's included, are token mode's
    for rid, fin in fast.finishes().items():
        toks = slow.tokens(rid)
        counts: dict[int, int] = {}
        itl.add(counts, tuple(Counter(itl.bucket(b - a) for (_, _, a), (_, _, b) in zip(toks, toks[1:])).items()))
        assert dict(fin.itl_buckets) == counts, rid


def test_a_sequence_is_preempted_at_most_once() -> None:
    e = engine(batch=2)
    arrivals = [(0.0, request("b0", "bulk", "batch", out=800)), (0.0, request("b1", "bulk", "batch", out=800))]
    arrivals += [(0.3 + 0.3 * k, request(f"i{k}", "chat", "interactive", out=40)) for k in range(6)]
    run = drive(e, until=math.inf, arrivals=arrivals)
    assert e.snapshot(100.0).preemptions == 2  # each batch sequence once
    assert all(run.finishes()[f"b{k}"].completion_tokens == 800 for k in range(2))


def same_snapshots(a: msgspec.Struct, b: msgspec.Struct) -> None:
    """Equal structs, floats to a relative 1e-9 (fast mode sums a run's steps in another order)."""

    def same(x: Any, y: Any, path: str) -> None:
        if isinstance(x, float) and isinstance(y, float):
            assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {x} != {y}"
        elif isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), path
            for k in x:
                same(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list):
            assert isinstance(y, list) and len(x) == len(y), path
            for k, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{path}[{k}]")
        else:
            assert x == y, f"{path}: {x!r} != {y!r}"

    same(msgspec.to_builtins(a), msgspec.to_builtins(b), type(a).__name__)


# -- both modes under the same calls, with classes and tenants -----------------------


MODELS = ("llama-3.1-8b", "llama-3.1-70b", "gpt-oss-20b")


def mixed(fast: bool, setup: dict[str, Any]) -> NodeEngine:
    cfg = DeploymentConfig.parse(setup["config"])
    return NodeEngine(
        TIGHT, [BundleModel(BUILTIN_MODELS[m], cfg) for m in setup["models"]], now=0.0,
        ddr_resident=setup["models"][:2], kv_cache_fraction=setup["kv"], time_slice=setup["slice"],
        switch_patience=0.02, starvation_s=setup["starvation"], token_events=not fast,
    )  # fmt: skip


traffic_st = st.lists(
    st.tuples(
        st.one_of(st.floats(0, 0.01), st.floats(0, 0.3)),  # gap to the previous arrival
        st.integers(0, 2),  # model
        st.integers(1, 600),  # prompt tail
        st.sampled_from([1, 7, 40, 120, 400]),  # max_tokens
        st.sampled_from(CLASS_NAMES),
        st.sampled_from(["a", "b", "c", ""]),
        st.sampled_from([1.0, 0.5, 3.0]),
        st.one_of(st.none(), st.floats(0, 0.6)),  # cancelled this long after arrival
    ),
    min_size=1, max_size=30,
)  # fmt: skip
setup_st = st.fixed_dictionaries({
    "config": st.sampled_from(["ss4096-bs4", "ss2048-bs2", "ss4096-bs1-cb2-16"]),
    "models": st.sampled_from([MODELS[:1], MODELS[:2], MODELS]),
    "kv": st.sampled_from([0.008, 0.05, 0.2]),
    "slice": st.sampled_from([0.004, 0.05]),
    "starvation": st.sampled_from([0.05, 0.3, 30.0]),
})  # fmt: skip


class Calls:
    """An engine and the calls made to it (to replay them on another), and what it answered."""

    def __init__(self, e: NodeEngine) -> None:
        self.e = e
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.events: list[EngineEvent] = []
        self.snaps: list[EngineSnapshot] = []
        self.rejected: list[str] = []

    def advance(self, t: float) -> None:
        self.calls.append(("advance", (t,)))
        self.events += [ev for ev in self.e.advance(t) if type(ev) is not TokenGenerated]

    def snapshot(self, t: float) -> None:
        self.calls.append(("snapshot", (t,)))
        self.snaps.append(self.e.snapshot(t))

    def cancel(self, rid: str, t: float) -> None:
        self.calls.append(("cancel", (rid, t)))
        self.e.cancel(rid, t)

    def submit(self, req: EngineRequest, t: float) -> None:
        self.calls.append(("submit", (req, t)))
        try:
            self.e.submit(req, t)
        except RequestRejected as err:
            self.rejected.append(err.code)

    def replay(self, e: NodeEngine) -> Calls:
        other = Calls(e)
        for name, args in self.calls:
            getattr(other, name)(*args)
        return other


def both_modes_drive(fast: bool, setup: dict[str, Any], traffic: list[tuple], ticks: list[float], driver: str) -> Calls:
    """`events`: advance to every next event (`replay`: and arrive exactly as a step
    begins); `coarse`: at the ticks and at each action; `lazy`: at the ticks only."""
    actions: list[tuple[float, int, str, Any]] = []
    t = 0.0
    for k, (gap, model, tail, out, cls, tenant, weight, cancel) in enumerate(traffic):
        t += gap
        name = setup["models"][model % len(setup["models"])]
        prompt = [k % 3] * 150 + list(range(1000 + k, 1000 + k + tail))
        actions.append((t, k, "submit", EngineRequest(f"r{k}", name, prompt, out, seed=k, ignore_eos=True, request_class=cls, tenant=tenant, tenant_weight=weight)))
        if cancel is not None:
            actions.append((t + cancel, k, "cancel", f"r{k}"))
    actions.sort(key=lambda a: (a[0], a[2] == "cancel", a[1]))
    rec = Calls(mixed(fast, setup))
    e = rec.e
    pending = sorted(ticks)
    for t, _, kind, payload in actions:
        if driver in ("events", "replay"):
            while (nxt := e.next_event_time()) is not None and nxt <= t:
                rec.advance(nxt)
            if driver == "replay" and kind == "submit" and nxt is not None:
                t = nxt
            rec.advance(t)
        else:
            while pending and pending[0] < t:
                rec.advance(pending.pop(0))
            if driver == "coarse":
                rec.advance(t)
        rec.snapshot(t)
        if kind == "cancel":
            rec.cancel(payload, t)
        else:
            rec.submit(payload, t)
    while (nxt := e.next_event_time()) is not None:
        rec.advance(nxt)
    rec.snapshot(1e6)
    return rec


def check_both_modes(traffic: list[tuple], setup: dict[str, Any], ticks: list[float], driver: str) -> Calls:
    slow = both_modes_drive(False, setup, traffic, ticks, driver)
    fast = slow.replay(mixed(True, setup)) if driver == "replay" else both_modes_drive(True, setup, traffic, ticks, driver)
    assert fast.rejected == slow.rejected
    assert len(fast.events) == len(slow.events)
    for a, b in zip(slow.events, fast.events):
        if type(b) is RequestFinished:
            b = msgspec.structs.replace(b, itl_buckets=())
        assert type(a) is type(b)
        same_snapshots(a, b)  # type: ignore[arg-type]
    assert len(fast.snaps) == len(slow.snaps)
    for a, b in zip(slow.snaps, fast.snaps):
        same_snapshots(a, b)
    return slow


drivers = st.sampled_from(["events", "replay", "coarse", "lazy"])


@given(traffic_st, setup_st, st.lists(st.floats(0, 6), max_size=12), drivers)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_mode_matches_with_classes_tenants_and_preemption(traffic: list[tuple], setup: dict[str, Any], ticks: list[float], driver: str) -> None:
    check_both_modes(traffic, setup, ticks, driver)


crowded = st.lists(
    st.tuples(
        st.floats(0, 0.05), st.integers(0, 2), st.integers(1, 600), st.sampled_from([40, 120, 400, 1000]),
        st.sampled_from(CLASS_NAMES), st.sampled_from(["a", "b", "c", ""]), st.sampled_from([1.0, 0.5, 3.0]),
        st.one_of(st.none(), st.none(), st.floats(0, 0.6)),
    ),
    min_size=1, max_size=40,
)  # fmt: skip


@given(crowded, setup_st, st.lists(st.floats(0, 6), max_size=12), drivers)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_mode_matches_when_interactive_work_preempts(traffic: list[tuple], setup: dict[str, Any], ticks: list[float], driver: str) -> None:
    """Long requests close together, a third of them interactive: full batches get preempted."""
    check_both_modes(traffic, setup, ticks, driver)
