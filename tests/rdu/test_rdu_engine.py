"""NodeEngine behaviour: outputs, tiers and switches, the prefix cache, batching, limits."""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    BundleModel,
    DeploymentConfig,
    EngineEvent,
    EngineRequest,
    EngineSnapshot,
    HardwareProfile,
    NodeEngine,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TokenGenerated,
    block_hashes,
    load_profiles,
)
from tierflow.rdu.timing import cold_load_time, switch_time
from tierflow.tokenizer import OUTPUT_VOCAB, decode_output

M8B, M70B = "llama-3.1-8b", "llama-3.1-70b"
SN40L = BUILTIN_PROFILES["sn40l-16"]
# 192 GiB of HBM: the 70B and the 8B fit one at a time, never together.
TIGHT = load_profiles({"tight": {"base": "sn40l-16", "hbm_bytes": 12 * 2**30}})["tight"]


def make(
    *names: str, profile: HardwareProfile = SN40L, config: str = "ss8192-bs4", **kw: Any
) -> NodeEngine:
    cfg = DeploymentConfig.parse(config)
    bundle = [BundleModel(BUILTIN_MODELS[n], cfg) for n in names]
    return NodeEngine(profile, bundle, now=0.0, **kw)


def req(
    rid: str,
    model: str = M8B,
    prompt: Sequence[int] | int = 100,
    max_tokens: int = 16,
    **kw: Any,
) -> EngineRequest:
    tokens = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    return EngineRequest(
        request_id=rid, model=model, prompt_token_ids=tokens, max_tokens=max_tokens, **kw
    )


def drain(e: NodeEngine, until: float = math.inf) -> list[EngineEvent]:
    """Advance event by event, as a live shell would, until idle or `until`."""
    out: list[EngineEvent] = []
    while (t := e.next_event_time()) is not None and t <= until:
        out += e.advance(t)
    return out


def of(events: Sequence[EngineEvent], kind: type, rid: str | None = None) -> list:
    return [ev for ev in events if type(ev) is kind and (rid is None or ev.request_id == rid)]


def one(events: Sequence[EngineEvent], kind: type, rid: str) -> Any:
    (ev,) = of(events, kind, rid)
    return ev


def ttft(events: Sequence[EngineEvent], rid: str, arrival: float) -> float:
    return next(ev.time for ev in of(events, TokenGenerated, rid) if ev.index == 0) - arrival


# -- outputs --------------------------------------------------------------------------


def test_output_is_deterministic_per_seed_prompt_and_model() -> None:
    def run(seed: int, model: str = M8B) -> list[tuple[int, str]]:
        e = make(M8B, "gpt-oss-20b")
        e.submit(req("r", model, 300, max_tokens=64, seed=seed, ignore_eos=True), 0.0)
        return [(ev.token_id, ev.text) for ev in of(drain(e), TokenGenerated)]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert first != run(7, "gpt-oss-20b")
    assert all(0 <= tid < len(OUTPUT_VOCAB) and text == decode_output([tid]) for tid, text in first)


def test_natural_length_stops_and_max_tokens_cuts() -> None:
    e = make(M8B, config="ss8192-bs64")
    for i in range(20):
        e.submit(req(f"r{i}", prompt=[i] * 50, max_tokens=2000), 0.0)
    e.submit(req("eos-ignored", prompt=[1] * 50, max_tokens=40, ignore_eos=True), 0.0)
    events = drain(e)
    done = {ev.request_id: ev for ev in of(events, RequestFinished)}
    stops = [ev for rid, ev in done.items() if rid.startswith("r")]
    assert {ev.finish_reason for ev in stops} == {"stop"}
    assert len({ev.completion_tokens for ev in stops}) > 5  # lengths vary with the prompt
    assert (done["eos-ignored"].finish_reason, done["eos-ignored"].completion_tokens) == (
        "length",
        40,
    )
    for rid, fin in done.items():
        indices = [ev.index for ev in of(events, TokenGenerated, rid)]
        assert indices == list(range(fin.completion_tokens))


def test_results_do_not_depend_on_how_often_advance_is_called() -> None:
    arrivals = [
        (0.0, req("a", M8B, 500, 30)),
        (0.01, req("b", M70B, 800, 20)),
        (0.02, req("c", M8B, 500, 25)),
        (0.3, req("d", M70B, 900, 10)),
    ]

    def fine() -> list[EngineEvent]:
        e, out = make(M8B, M70B), []
        for t, r in arrivals:
            out += drain(e, until=t)
            out += e.advance(t)
            e.submit(r, t)
        return out + drain(e)

    def coarse() -> list[EngineEvent]:
        e, out = make(M8B, M70B), []
        for t, r in arrivals:
            out += e.advance(t)
            e.submit(r, t)
        return out + e.advance(math.inf)

    assert fine() == coarse()


# -- tiers, switches, cold loads ------------------------------------------------------


def test_switch_from_ddr_costs_the_copy_and_cold_costs_storage() -> None:
    e = make(M8B, M70B, ddr_resident=[M8B])  # 70B is not on the node yet
    e.submit(req("warm", M8B), 0.0)
    events = drain(e)
    warm = one(events, RequestStarted, "warm")
    assert warm.tier == "ddr"
    assert 0.010 < warm.switch_seconds < 0.050  # tens of ms for an 8B on 16 sockets
    assert warm.switch_seconds == pytest.approx(switch_time(BUILTIN_MODELS[M8B], SN40L))

    t0 = events[-1].time
    e.submit(req("cold", M70B), t0)
    cold = one(drain(e), RequestStarted, "cold")
    assert cold.tier == "cold"
    assert cold.switch_seconds == pytest.approx(cold_load_time(BUILTIN_MODELS[M70B], SN40L))
    assert cold.switch_seconds > 20 * warm.switch_seconds

    e.submit(req("hot", M8B), 100.0)
    hot = one(drain(e), RequestStarted, "hot")
    assert (hot.tier, hot.switch_seconds, hot.queue_time) == ("hbm", 0.0, 0.0)
    snap = e.snapshot(200.0)
    assert snap.bytes_moved["storage->ddr"] == snap.models[1].weight_bytes
    assert snap.bytes_moved["ddr->hbm"] == snap.models[0].weight_bytes + snap.models[1].weight_bytes


def test_switching_between_models_that_cannot_share_hbm_pays_each_time() -> None:
    e = make(M8B, M70B, profile=TIGHT)
    t = 0.0
    tiers = []
    for i, model in enumerate([M8B, M70B, M8B, M70B]):
        e.submit(req(f"r{i}", model), t)
        events = drain(e)
        tiers.append(one(events, RequestStarted, f"r{i}").tier)
        t = events[-1].time
    assert tiers == ["ddr"] * 4
    moved = e.snapshot(t).bytes_moved["ddr->hbm"]
    assert moved == 2 * (
        e.snapshot(t).models[0].weight_bytes + e.snapshot(t).models[1].weight_bytes
    )


def test_a_model_with_requests_in_flight_is_never_evicted() -> None:
    e = make(M8B, M70B, profile=TIGHT, preload=[M70B])
    e.submit(req("long", M70B, max_tokens=1000, ignore_eos=True), 0.0)  # ~2 s of decode
    e.submit(req("small", M8B), 0.05)
    events = drain(e, until=0.5)
    snap = e.snapshot(0.5)
    big = next(m for m in snap.models if m.name == M70B)
    assert (big.tier, big.in_flight) == ("hbm", 1)
    assert not of(events, RequestStarted, "small")  # it waits: evicting the 70B is not allowed
    events += drain(e)
    finished_long = one(events, RequestFinished, "long").time
    small = one(events, RequestStarted, "small")
    assert small.time >= finished_long and small.tier == "ddr"


def test_preload_starts_models_in_hbm_and_snapshot_reports_tiers() -> None:
    e = make(M8B, M70B, "gpt-oss-20b", preload=[M8B], ddr_resident=[M70B])
    tiers = {m.name: m.tier for m in e.snapshot(0.0).models}
    assert tiers == {M8B: "hbm", M70B: "ddr", "gpt-oss-20b": "cold"}
    e.submit(req("r", M70B), 0.0)
    e.advance(0.0)
    assert {m.name: m.tier for m in e.snapshot(0.0).models}[M70B] == "loading"


# -- prefix cache ---------------------------------------------------------------------


def test_a_repeated_system_prompt_hits_the_cache_and_cuts_ttft() -> None:
    e = make(M70B, preload=[M70B])
    system = list(range(3000))
    e.submit(req("first", M70B, system + [1, 2, 3], max_tokens=4), 0.0)
    events = drain(e)
    e.submit(req("second", M70B, system + [4, 5, 6, 7], max_tokens=4), 10.0)
    events += drain(e)
    assert one(events, RequestStarted, "first").prefix_hit_tokens == 0
    hit = one(events, RequestStarted, "second").prefix_hit_tokens
    assert hit == (3000 // e.block_size) * e.block_size
    assert one(events, RequestFinished, "second").cached_prompt_tokens == hit
    assert ttft(events, "second", 10.0) < ttft(events, "first", 0.0) / 5
    snap = e.snapshot(20.0)
    assert snap.prefix_cache_hits == hit and snap.prefix_cache_queries >= 2 * hit
    assert set(block_hashes(system, e.block_size)) <= set(snap.recent_prefix_hashes)
    assert snap.models[0].recent_prefix_hashes[: len(snap.recent_prefix_hashes)] == (
        snap.recent_prefix_hashes
    )
    assert snap.prefix_cache_blocks.hbm >= 3000 // e.block_size


def test_prefill_only_and_prefilled_requests() -> None:
    e = make(M70B, preload=[M70B])
    e.submit(req("prefill", M70B, 2000, max_tokens=0), 0.0)
    events = drain(e)
    fin = one(events, RequestFinished, "prefill")
    assert (fin.finish_reason, fin.completion_tokens, fin.prompt_tokens) == ("prefill", 0, 2000)
    assert not of(events, TokenGenerated, "prefill")
    normal_ttft = fin.time

    e2 = make(M70B, preload=[M70B])
    e2.submit(req("decode", M70B, 2000, max_tokens=8, prefilled=True), 0.0)
    events = drain(e2)
    assert ttft(events, "decode", 0.0) < normal_ttft / 10  # only the KV write into HBM
    assert (
        e2.snapshot(1.0).bytes_moved["net->hbm"] == 2000 * BUILTIN_MODELS[M70B].kv_bytes_per_token
    )


# -- limits and rejections ------------------------------------------------------------


def test_over_length_requests_are_rejected_with_actionable_numbers() -> None:
    e = make(M8B)
    with pytest.raises(RequestRejected) as info:
        e.submit(req("long", prompt=8000, max_tokens=500), 0.0)
    err = info.value
    assert err.code == "context_length_exceeded"
    for number in ("8000", "500", "8500", "8192", "192"):
        assert number in err.message
    with pytest.raises(RequestRejected, match="shorten the prompt"):
        e.submit(req("huge", prompt=9000, max_tokens=1), 0.0)
    e.submit(req("fits", prompt=8000, max_tokens=192), 0.0)  # exactly the sequence length


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (req("x", model="gpt-oss-120b"), "model_not_in_bundle"),
        (req("x", prompt=0), "invalid_request"),
        (req("x", max_tokens=-1), "invalid_request"),
        (req("x", prompt=[1, 2**40]), "invalid_request"),
    ],
)
def test_bad_requests_are_rejected(request_: EngineRequest, code: str) -> None:
    with pytest.raises(RequestRejected) as info:
        make(M8B).submit(request_, 0.0)
    assert info.value.code == code


def test_queue_full_and_duplicate_ids() -> None:
    e = make(M8B, max_queue=2)
    e.submit(req("a"), 0.0)
    with pytest.raises(RequestRejected) as dup:
        e.submit(req("a"), 0.0)
    assert dup.value.code == "duplicate_request"
    e.submit(req("b"), 0.0)
    with pytest.raises(RequestRejected) as full:
        e.submit(req("c"), 0.0)
    assert full.value.code == "queue_full"


def test_batch_size_limits_the_running_batch() -> None:
    e = make(M8B, config="ss8192-bs4", preload=[M8B])
    for i in range(10):
        e.submit(req(f"r{i}", max_tokens=50, ignore_eos=True), 0.0)
    events: list[EngineEvent] = []
    running_max = 0
    while (t := e.next_event_time()) is not None:
        events += e.advance(t)
        snap = e.snapshot(t)
        running_max = max(running_max, snap.running)
        assert snap.running + snap.queue_depth + len(of(events, RequestFinished)) == 10
    assert running_max == 4
    first_finish = min(ev.time for ev in of(events, RequestFinished))
    assert len([ev for ev in of(events, RequestStarted) if ev.time < first_finish]) == 4


def test_continuous_batching_admits_as_slots_free() -> None:
    e = make(M8B, config="ss8192-bs1-cb2-8", preload=[M8B])
    for i in range(8):
        e.submit(req(f"r{i}", max_tokens=20 + 10 * i, ignore_eos=True), 0.0)
    e.submit(req("late", max_tokens=5), 0.001)
    events = drain(e)
    late = one(events, RequestStarted, "late")
    first_done = min(ev.time for ev in of(events, RequestFinished))
    assert late.time == pytest.approx(first_done)  # joins the batch the moment a slot frees


def test_cancel_frees_the_slot_and_the_kv() -> None:
    e = make(M8B, config="ss8192-bs1", preload=[M8B])
    e.submit(req("a", max_tokens=500, ignore_eos=True), 0.0)
    e.submit(req("b", max_tokens=5), 0.0)
    e.submit(req("c", max_tokens=5), 0.0)
    events = drain(e, until=0.05)
    before = e.snapshot(0.05)
    assert (before.running, before.queue_depth) == (1, 2) and before.kv_usage > 0
    e.cancel("c", 0.05)  # waiting
    e.cancel("a", 0.05)  # running
    e.cancel("nope", 0.05)  # unknown ids are ignored
    after = e.snapshot(0.05)
    assert (after.running, after.queue_depth, after.kv_usage) == (0, 1, 0.0)
    assert after.models[0].in_flight == 0
    events += drain(e)
    assert one(events, RequestStarted, "b").time < 0.06
    assert not of(events, RequestFinished, "a") and not of(events, RequestStarted, "c")
    assert max(ev.index for ev in of(events, TokenGenerated, "a")) < 499


def test_models_take_turns_on_the_chip() -> None:
    e = make(M8B, "gpt-oss-20b", preload=[M8B, "gpt-oss-20b"], time_slice=0.02)
    e.submit(req("x", M8B, max_tokens=300, ignore_eos=True), 0.0)
    e.submit(req("y", "gpt-oss-20b", max_tokens=300, ignore_eos=True), 0.0)
    events = drain(e)
    # whichever finishes first (their step times are close), the other ran in between
    first, second = sorted("xy", key=lambda r: one(events, RequestFinished, r).time)
    first_done = one(events, RequestFinished, first).time
    second_before = [ev for ev in of(events, TokenGenerated, second) if ev.time < first_done]
    assert 0 < len(second_before) < 300
    assert [ev.time for ev in events] == sorted(ev.time for ev in events)


def test_zero_profile_does_everything_instantly() -> None:
    e = make(M8B, M70B, profile=BUILTIN_PROFILES["zero"], ddr_resident=[])
    e.submit(req("a", M8B, max_tokens=20), 5.0)
    e.submit(req("b", M70B, max_tokens=20), 5.0)
    events = e.advance(5.0)
    assert {ev.time for ev in events} == {5.0}
    assert len(of(events, RequestFinished)) == 2
    assert e.next_event_time() is None


def test_construction_checks_fit_and_names() -> None:
    with pytest.raises(ValueError, match=r"llama-3.1-405b needs .* GB of HBM"):
        make("llama-3.1-405b", profile=BUILTIN_PROFILES["sn40l-8"])
    with pytest.raises(ValueError, match="maximum context"):
        make(M8B, config="ss262144-bs1")
    with pytest.raises(ValueError, match="not in the bundle"):
        make(M8B, preload=[M70B])
    with pytest.raises(ValueError, match="more than once"):
        make(M8B, M8B)
    with pytest.raises(ValueError, match="HBM"):
        make(M8B, M70B, profile=TIGHT, preload=[M8B, M70B])


def test_snapshot_and_events_encode_as_wire_messages() -> None:
    e = make(M8B)
    e.submit(req("r", max_tokens=3), 0.0)
    events = drain(e)
    wire = msgspec.json.encode(events)
    assert msgspec.json.decode(wire, type=list[EngineEvent]) == events
    snap = e.snapshot(1.0)
    assert msgspec.json.decode(msgspec.json.encode(snap), type=EngineSnapshot) == snap


def test_the_library_is_pure() -> None:
    """No I/O, no event loop, no clock: the shells bring those."""
    banned = {
        "asyncio",
        "nats",
        "grpc",
        "socket",
        "subprocess",
        "time",
        "datetime",
        "threading",
        "os",
    }
    root = Path(__file__).resolve().parents[2] / "libs" / "rdu"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            else:
                continue
            assert not {m.split(".")[0] for m in mods} & banned, f"{path.name} imports {mods}"


def test_a_model_that_cannot_get_hbm_is_not_starved_by_a_busy_one() -> None:
    """FCFS across models: the 70B stops admitting newer work so the 8B gets its turn."""
    e = make(M8B, M70B, profile=TIGHT, preload=[M70B], config="ss8192-bs1-cb2-32")
    events: list[EngineEvent] = []
    for i in range(60):  # a steady stream of 70B work for 6 s
        t = 0.1 * i
        events += e.advance(t)
        e.submit(req(f"big{i}", M70B, [i] * 200, max_tokens=300, ignore_eos=True), t)
        if i == 2:
            e.submit(req("small", M8B), t)
    events += e.advance(math.inf)
    small = one(events, RequestStarted, "small")
    assert small.tier == "ddr" and small.time < 2.0
    assert one(events, RequestFinished, "big59").time > small.time
