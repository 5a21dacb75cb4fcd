"""Property tests of a whole node under random traffic on a node too small for its bundle."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierflow.rdu import (
    BUILTIN_MODELS,
    BundleModel,
    DeploymentConfig,
    EngineEvent,
    EngineRequest,
    NodeEngine,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TokenGenerated,
    load_profiles,
)

# 192 GiB of HBM: the 70B needs most of it, so models must take turns and evict each other.
TIGHT = load_profiles({"tight": {"base": "sn40l-16", "hbm_bytes": 12 * 2**30}})["tight"]
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "gpt-oss-20b")

arrival = st.tuples(
    st.floats(0, 0.5),  # gap to the previous arrival, seconds
    st.sampled_from(MODELS),
    st.integers(0, 3),  # which shared system prompt
    st.integers(1, 600),  # prompt tail
    st.integers(0, 40),  # max_tokens (0 = prefill only)
    st.booleans(),  # cancel it a little later
)


@given(
    st.lists(arrival, min_size=1, max_size=25), st.sampled_from(["ss4096-bs4", "ss4096-bs1-cb2-16"])
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_traffic_keeps_every_invariant(arrivals: list, config: str) -> None:
    cfg = DeploymentConfig.parse(config)
    bundle = [BundleModel(BUILTIN_MODELS[m], cfg) for m in MODELS]
    e = NodeEngine(TIGHT, bundle, now=0.0, ddr_resident=MODELS[:2], kv_cache_fraction=0.1)
    hbm_cap = TIGHT.hbm_capacity
    events: list[EngineEvent] = []
    accepted: set[str] = set()
    cancelled: set[str] = set()
    cancels: list[tuple[float, str]] = []
    t = 0.0

    def step_to(until: float) -> None:
        while (nxt := e.next_event_time()) is not None and nxt <= until:
            events.extend(e.advance(nxt))
            check(nxt)
        events.extend(e.advance(until))
        check(until)

    def check(now: float) -> None:
        snap = e.snapshot(now)
        for m in snap.models:
            if m.in_flight:
                assert m.tier == "hbm", f"{m.name} has requests in flight but is in {m.tier}"
        resident = sum(m.weight_bytes for m in snap.models if m.tier in ("hbm", "loading"))
        assert resident <= hbm_cap * 0.9 + 1  # the KV pool takes the other 10%
        assert 0.0 <= snap.kv_usage <= 1.0
        if snap.busy_until is None:  # copies are charged when work starts, busy time when it ends
            assert sum(snap.transfer_seconds.values()) <= snap.busy_seconds + 1e-9

    for i, (gap, model, system, tail, max_tokens, cancel) in enumerate(arrivals):
        t += gap
        while cancels and cancels[0][0] <= t:
            when, rid = cancels.pop(0)
            step_to(when)
            e.cancel(rid, when)
            cancelled.add(rid)
        step_to(t)
        prompt = [system] * 256 + list(range(tail))
        try:
            e.submit(EngineRequest(f"r{i}", model, prompt, max_tokens, seed=i), t)
        except RequestRejected as err:
            assert err.code == "context_length_exceeded"
            continue
        accepted.add(f"r{i}")
        if cancel:
            cancels.append((t + 0.01, f"r{i}"))
    for when, rid in cancels:
        step_to(when)
        e.cancel(rid, when)
        cancelled.add(rid)
    step_to(math.inf)

    assert e.next_event_time() is None
    final = e.snapshot(t)
    assert (final.running, final.queue_depth, final.kv_usage) == (0, 0, 0.0)
    assert [ev.time for ev in events] == sorted(ev.time for ev in events)
    for rid in accepted:
        fins = [ev for ev in events if type(ev) is RequestFinished and ev.request_id == rid]
        toks = [ev.index for ev in events if type(ev) is TokenGenerated and ev.request_id == rid]
        starts = [ev for ev in events if type(ev) is RequestStarted and ev.request_id == rid]
        assert toks == list(range(len(toks)))
        assert len(starts) <= 1
        if rid in cancelled:
            assert len(fins) <= 1
        else:
            assert len(fins) == 1 and len(starts) == 1 and fins[0].completion_tokens == len(toks)
    # every byte moved is paid for in time, at the bandwidth of its path
    moved, seconds = final.bytes_moved, final.transfer_seconds
    rates = {
        "ddr->hbm": TIGHT.switch_bw,
        "hbm->ddr": TIGHT.switch_bw,
        "storage->ddr": TIGHT.storage_bw,
        "net->hbm": TIGHT.node_hbm_bw * TIGHT.hbm_efficiency,
    }
    for pair, nbytes in moved.items():
        assert seconds[pair] == pytest.approx(nbytes / rates[pair])
    assert sum(seconds.values()) <= final.busy_seconds + 1e-9
