"""The router's request path with scripted nodes behind the NodeTransport port.

The NATS adapter is exercised by the whole-fabric tests; here the port lets each
failure mode be staged exactly (the httpx MockTransport pattern).
"""

from __future__ import annotations

import asyncio

from collections.abc import Callable, Mapping

import pytest
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages, registry
from tierflow.runtime.clock import VirtualClock
from tierflow.runtime.errors import InvalidRequest, ModelNotFound, NoCapacity, NodeFailure
from tierflow.placement import LeastLoaded, SessionTable
from tierflow.services.router.config import load_router_config
from tierflow.services.router.dispatch import Dispatcher, GenerateParams, RequestRecord
from tierflow.services.router.metrics import RouterMetrics
from tierflow.placement.tables import ModelTable, NodeTable
from tierflow.services.router.transport import NodeLost

class LinkBroke:
    """In a script: the router's own NATS connection was re-made before the next message."""


Script = list[messages.StreamEvent | NodeLost | LinkBroke]


class ScriptedStream:
    def __init__(self, node_id: str, script: Script) -> None:
        self.node_id = node_id
        self._script = list(script)
        self.cancelled = False
        self.closed = False
        self.link_broke = False
        self.ahead = False  # report the rest of the script as already received (buffered)

    def buffered(self) -> bool:
        return self.ahead and bool(self._script)

    async def next(self) -> messages.StreamEvent:
        item = self._script.pop(0)
        if isinstance(item, NodeLost):
            raise item
        if isinstance(item, LinkBroke):
            self.link_broke = True
            item = self._script.pop(0)
        return item  # type: ignore[return-value]

    async def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        self.closed = True


class ScriptedTransport:
    def __init__(self, behaviour: dict[str, Callable[[messages.GenerateRequest], Script]]) -> None:
        self.behaviour = behaviour
        self.opened: list[tuple[str, messages.GenerateRequest, ScriptedStream]] = []
        self.ahead = False  # streams say their messages are all here already

    async def open(self, node_id: str, request: messages.GenerateRequest, headers: Mapping[str, str] | None, *, role: str = "decode") -> ScriptedStream:
        stream = ScriptedStream(node_id, self.behaviour[node_id](request))
        stream.ahead = self.ahead
        self.opened.append((node_id, request, stream))
        return stream


def ok(n_tokens: int = 3) -> Callable[[messages.GenerateRequest], Script]:
    def script(req: messages.GenerateRequest) -> Script:
        events: Script = [messages.Accepted(request_id=req.request_id, node_id="x"), messages.Started(request_id=req.request_id, tier="ddr", queue_time=0.01)]
        events += [messages.Tokens(request_id=req.request_id, index=i, token_ids=[i], text=f" t{i}") for i in range(n_tokens)]
        events.append(messages.Finished(request_id=req.request_id, finish_reason="length", prompt_tokens=len(req.prompt_token_ids), completion_tokens=n_tokens))
        return events
    return script


def lost_before_tokens(req: messages.GenerateRequest) -> Script:
    return [messages.Accepted(request_id=req.request_id, node_id="x"), NodeLost("n", "silent for 1.50s")]


def lost_after_tokens(req: messages.GenerateRequest) -> Script:
    return [messages.Tokens(request_id=req.request_id, index=0, token_ids=[1], text=" a"), NodeLost("n", "no responders")]


def rejects(code: str, retryable: bool) -> Callable[[messages.GenerateRequest], Script]:
    return lambda req: [messages.Failed(request_id=req.request_id, code=code, message=f"{code}!", retryable=retryable)]


def _setup(behaviour: dict[str, Callable[[messages.GenerateRequest], Script]], *, resume_wait: float = 0.0, clock: VirtualClock | None = None) -> tuple[Dispatcher, ScriptedTransport, NodeTable]:
    clock = clock or VirtualClock(100.0)
    nodes = NodeTable()
    for i, node in enumerate(behaviour):
        # queue depth orders the nodes: the first listed is tried first
        nodes.apply(messages.NodeHeartbeat(node_id=node, models=[messages.ModelState(name="m")], queue_depth=i, max_batch=4, started_at=1.0), clock.monotonic())
    models = ModelTable()
    models.put_model(registry.ModelRecord(name="m", versions=[registry.ModelVersionRecord(version="v1")], default_version="v1"))
    models.put_deployment(registry.DeploymentRecord(name="d", bundle="b", models=[registry.BundleEntry(model="m", version="v1", config="ss1024-bs4")]))
    transport = ScriptedTransport(behaviour)
    dispatcher = Dispatcher(
        nodes, models, transport, clock, RouterMetrics(CollectorRegistry()),
        policy=LeastLoaded(), tenants=load_router_config("").tenants, sessions=SessionTable(100), seed=0, resume_wait=resume_wait,
    )
    return dispatcher, transport, nodes


async def _run(dispatcher: Dispatcher, **kw: object) -> tuple[list[messages.Tokens | messages.Finished], RequestRecord]:
    params = GenerateParams(request_id="req1", model=kw.pop("model", "m"), prompt_token_ids=[1, 2, 3], max_tokens=kw.pop("max_tokens", 8), api="chat")  # type: ignore[arg-type]
    record = RequestRecord(request_id="req1", api="chat", arrived=100.0)
    return [e async for e in dispatcher.generate(params, record)], record


async def test_happy_path_streams_and_records() -> None:
    dispatcher, transport, _ = _setup({"a": ok(3), "b": ok(3)})
    events, record = await _run(dispatcher)
    assert [type(e).__name__ for e in events] == ["Tokens"] * 3 + ["Finished"]
    assert record.node == "a" and record.tier == "ddr" and record.completion_tokens == 3 and record.nodes_tried == ["a"]
    assert transport.opened[0][2].closed and not transport.opened[0][2].cancelled


def _tokens(events: list[messages.Tokens | messages.Finished]) -> list[tuple[int, list[int], str]]:
    return [(e.index, list(e.token_ids), e.text) for e in events if type(e) is messages.Tokens]


async def test_tokens_already_received_go_out_as_one_event_with_exact_indices() -> None:
    dispatcher, transport, _ = _setup({"a": ok(5)})
    transport.ahead = True
    events, record = await _run(dispatcher)
    assert [type(e).__name__ for e in events] == ["Tokens", "Finished"]
    assert _tokens(events) == [(0, [0, 1, 2, 3, 4], " t0 t1 t2 t3 t4")]
    assert record.completion_tokens == 5 and record.finish_reason == "length"


async def test_coalescing_stops_at_a_gap_or_a_lost_node_and_the_stream_migrates_exactly() -> None:
    def gap(req: messages.GenerateRequest) -> Script:
        return [messages.Tokens(request_id=req.request_id, index=i, token_ids=[i], text=f" t{i}") for i in (0, 1, 3)]

    def lost(req: messages.GenerateRequest) -> Script:
        return [*(messages.Tokens(request_id=req.request_id, index=i, token_ids=[i], text=f" t{i}") for i in (0, 1)), NodeLost("a", "no responders")]

    for script in (gap, lost):
        dispatcher, transport, nodes = _setup({"a": script, "b": ok(4)})
        transport.ahead = True
        events, record = await _run(dispatcher)
        # a's two tokens as one event; b repeats them (trimmed), then 2 and 3 as one event
        assert _tokens(events) == [(0, [0, 1], " t0 t1"), (2, [2, 3], " t2 t3")]
        assert type(events[-1]) is messages.Finished and record.migrations == 1 and record.nodes_tried == ["a", "b"]
        assert [n.node_id for n in nodes.views if n.suspect_until > 100.0] == ["a"]


async def test_node_lost_before_first_token_retries_elsewhere_and_marks_it() -> None:
    dispatcher, transport, nodes = _setup({"a": lost_before_tokens, "b": ok(2)})
    events, record = await _run(dispatcher)
    assert record.nodes_tried == ["a", "b"] and record.node == "b" and len(events) == 3
    assert [r.attempt for _, r, _ in transport.opened] == [1, 2]
    assert transport.opened[0][2].cancelled
    assert [n.node_id for n in nodes.views if n.suspect_until > 100.0] == ["a"]


async def test_silence_or_a_gap_from_the_routers_own_broken_link_moves_on_without_blaming_the_node() -> None:
    def ours_silent(req: messages.GenerateRequest) -> Script:
        return [messages.Tokens(request_id=req.request_id, index=0, token_ids=[1], text=" a"), NodeLost("a", "link broke", ours=True)]

    def ours_gap(req: messages.GenerateRequest) -> Script:
        return [messages.Tokens(request_id=req.request_id, index=0, token_ids=[1], text=" a"), LinkBroke(),
                messages.Tokens(request_id=req.request_id, index=2, token_ids=[2], text=" b")]  # fmt: skip

    for script in (ours_silent, ours_gap):
        dispatcher, _, nodes = _setup({"a": script, "b": ok(3)})
        events, record = await _run(dispatcher)
        assert record.nodes_tried == ["a", "b"] and record.completion_tokens == 3 and record.migrations == 1
        assert not [n.node_id for n in nodes.views if n.suspect_until > 100.0]  # a is not suspect: the link was ours


async def test_a_broken_stream_with_no_other_node_waits_and_resumes_on_the_same_one_once_it_beats_again() -> None:
    """The only node of its deployment lost the stream (its NATS member died): the stream
    waits, the node beats twice (no longer suspect) and resumes it exactly."""
    attempts = iter([lost_after_tokens, ok(3)])
    clock = VirtualClock(100.0)
    dispatcher, transport, nodes = _setup({"a": lambda req: next(attempts)(req)}, resume_wait=5.0, clock=clock)
    run = asyncio.create_task(_run(dispatcher))
    for _ in range(100):
        await asyncio.sleep(0)
    assert [n.node_id for n in nodes.views if n.suspect_until > clock.monotonic()] == ["a"]
    await _beat_back(run, clock, nodes)
    events, record = await asyncio.wait_for(run, 5)
    tokens = [e for e in events if isinstance(e, messages.Tokens)]
    assert [(t.index, t.token_ids) for t in tokens] == [(0, [1]), (1, [1]), (2, [2])]
    assert record.nodes_tried == ["a", "a"] and record.migrations == 1
    assert transport.opened[1][1].resume_token_ids == [1]


async def _beat_back(run: asyncio.Task, clock: VirtualClock, nodes: NodeTable, *, seqs: tuple[int, ...] = (1, 2)) -> None:
    """Node a beats after its failure (twice: no longer suspect), then time runs on."""
    for _ in range(100):
        await asyncio.sleep(0)
    assert not run.done()
    for seq in seqs:
        clock.advance(0.5)
        nodes.apply(messages.NodeHeartbeat(node_id="a", models=[messages.ModelState(name="m")], max_batch=4, started_at=1.0, seq=seq, sent_at=clock.now()), clock.monotonic())
    for _ in range(5):
        clock.advance(0.1)
        for _ in range(50):
            await asyncio.sleep(0)


async def test_a_request_without_output_waits_for_its_only_node_rather_than_fail() -> None:
    """Its node lost it before the first token (a NATS member died under the node) and no
    other node serves the model: the client sees a wait, not a 502."""
    attempts = iter([lost_before_tokens, ok(2)])
    clock = VirtualClock(100.0)
    dispatcher, _, nodes = _setup({"a": lambda req: next(attempts)(req)}, resume_wait=5.0, clock=clock)
    run = asyncio.create_task(_run(dispatcher))
    await _beat_back(run, clock, nodes)
    events, record = await asyncio.wait_for(run, 5)
    assert len(events) == 3 and record.nodes_tried == ["a", "a"] and record.migrations == 0


async def test_a_fresh_request_waits_while_every_node_is_out_only_for_a_moment() -> None:
    clock = VirtualClock(100.0)
    dispatcher, transport, nodes = _setup({"a": ok(2)}, resume_wait=5.0, clock=clock)
    nodes.mark_suspect("a", clock.monotonic())  # another request's stream broke on it
    run = asyncio.create_task(_run(dispatcher))
    await _beat_back(run, clock, nodes)
    events, record = await asyncio.wait_for(run, 5)
    assert len(events) == 3 and record.nodes_tried == ["a"]
    # A node silent for longer than the wait is not coming back soon: no wait, a clear 503.
    clock.advance(60.0)
    with pytest.raises(NoCapacity, match="1 silent"):
        await asyncio.wait_for(_run(dispatcher), 1)
    assert len(transport.opened) == 1


async def test_retryable_failure_moves_on_but_client_errors_do_not() -> None:
    dispatcher, _, _ = _setup({"a": rejects("queue_full", True), "b": ok(1)})
    _, record = await _run(dispatcher)
    assert record.nodes_tried == ["a", "b"]
    dispatcher, transport, _ = _setup({"a": rejects("context_length_exceeded", False), "b": ok(1)})
    with pytest.raises(InvalidRequest):
        await _run(dispatcher)
    assert len(transport.opened) == 1


async def test_node_lost_after_first_token_resumes_on_another_node_without_a_seam() -> None:
    dispatcher, transport, nodes = _setup({"a": lost_after_tokens, "b": ok(3)})
    events, record = await _run(dispatcher)
    tokens = [e for e in events if isinstance(e, messages.Tokens)]
    # a sent token 0; b restarts the same completion and the router keeps only 1 and 2
    assert [(t.index, t.token_ids) for t in tokens] == [(0, [1]), (1, [1]), (2, [2])]
    assert isinstance(events[-1], messages.Finished) and record.completion_tokens == 3
    assert record.migrations == 1 and record.nodes_tried == ["a", "b"] and record.node == "b"
    resumed = transport.opened[1][1]
    assert resumed.resume_token_ids == [1] and resumed.prompt_token_ids == [1, 2, 3] and resumed.attempt == 2
    assert resumed.seed == transport.opened[0][1].seed  # the same completion, so the same seed
    assert [n.node_id for n in nodes.views if n.suspect_until > 100.0] == ["a"]


def _broken(*, index_after_gap: int) -> Callable[[messages.GenerateRequest], Script]:
    """Token 0, then (a message lost) the token at `index_after_gap`."""
    def script(req: messages.GenerateRequest) -> Script:
        return [
            messages.Tokens(request_id=req.request_id, index=0, token_ids=[0], text=" t0"),
            messages.Tokens(request_id=req.request_id, index=index_after_gap, token_ids=[index_after_gap], text=f" t{index_after_gap}"),
            messages.Finished(request_id=req.request_id, finish_reason="length", prompt_tokens=3, completion_tokens=index_after_gap + 1),
        ]
    return script


async def test_a_gap_in_token_indices_is_a_node_failure_never_silence() -> None:
    dispatcher, transport, _ = _setup({"a": _broken(index_after_gap=2), "b": ok(3)})
    events, record = await _run(dispatcher)
    assert [e.index for e in events if isinstance(e, messages.Tokens)] == [0, 1, 2]
    assert record.migrations == 1 and transport.opened[1][1].resume_token_ids == [0]


async def test_a_finish_that_claims_more_tokens_than_arrived_is_a_gap() -> None:
    def finishes_short(req: messages.GenerateRequest) -> Script:
        return [
            messages.Tokens(request_id=req.request_id, index=0, token_ids=[0], text=" t0"),
            messages.Finished(request_id=req.request_id, finish_reason="length", prompt_tokens=3, completion_tokens=3),
        ]

    dispatcher, _, _ = _setup({"a": finishes_short, "b": ok(3)})
    events, record = await _run(dispatcher)
    assert record.migrations == 1 and record.completion_tokens == 3
    assert [e.index for e in events if isinstance(e, messages.Tokens)] == [0, 1, 2]


async def test_a_node_shutting_down_mid_stream_is_migrated_too() -> None:
    def shuts_down(req: messages.GenerateRequest) -> Script:
        return [
            messages.Tokens(request_id=req.request_id, index=0, token_ids=[0], text=" t0"),
            messages.Failed(request_id=req.request_id, code="node_shutdown", message="bye", retryable=True),
        ]

    dispatcher, _, _ = _setup({"a": shuts_down, "b": ok(2)})
    events, record = await _run(dispatcher)
    assert record.migrations == 1 and isinstance(events[-1], messages.Finished)


async def test_with_no_node_left_a_broken_stream_is_a_clear_error() -> None:
    dispatcher, transport, _ = _setup({"a": lost_after_tokens})
    seen: list[int] = []
    with pytest.raises(NodeFailure, match="incomplete") as err:
        params = GenerateParams(request_id="req1", model="m", prompt_token_ids=[1, 2, 3], max_tokens=8, api="chat")
        async for event in dispatcher.generate(params, RequestRecord(request_id="req1", api="chat", arrived=100.0)):
            seen += [event.index] if isinstance(event, messages.Tokens) else []
    assert seen == [0] and err.value.code == "node_lost" and len(transport.opened) == 1


async def test_migrations_are_limited_per_request() -> None:
    dispatcher, transport, _ = _setup({n: lost_after_tokens for n in "abcde"})
    with pytest.raises(NodeFailure, match="broke 3 times"):
        await _run(dispatcher)
    assert len(transport.opened) == 3  # max_migrations = 2: the third failure ends it


async def test_the_deadline_goes_to_the_node_and_ends_the_wait() -> None:
    from tierflow.runtime.errors import DeadlineExceeded

    dispatcher, transport, _ = _setup({"a": ok(1)})
    clock = dispatcher._clock
    params = GenerateParams(request_id="r", model="m", prompt_token_ids=[1, 2, 3], max_tokens=4, api="chat", timeout=2.5)
    [e async for e in dispatcher.generate(params, RequestRecord(request_id="r", api="chat", arrived=clock.monotonic()))]
    assert transport.opened[0][1].timeout_s == pytest.approx(2.5)

    def slow(req: messages.GenerateRequest) -> Script:
        clock.advance(3.0)  # type: ignore[attr-defined]  # the node queues it past the deadline
        return [messages.Accepted(request_id=req.request_id, node_id="a"), messages.Alive(request_id=req.request_id)]

    dispatcher._transport.behaviour["a"] = slow  # type: ignore[attr-defined]
    with pytest.raises(DeadlineExceeded) as err:
        [e async for e in dispatcher.generate(params, RequestRecord(request_id="r", api="chat", arrived=clock.monotonic()))]
    assert err.value.http_status == 504 and transport.opened[-1][2].cancelled


async def test_all_nodes_failing_ends_with_a_retryable_error() -> None:
    dispatcher, _, _ = _setup({"a": lost_before_tokens, "b": lost_before_tokens})
    with pytest.raises(NodeFailure, match="a, b") as err:
        await _run(dispatcher)
    assert err.value.retryable


async def test_unknown_model_no_nodes_and_context_limits() -> None:
    dispatcher, _, _ = _setup({"a": ok()})
    with pytest.raises(ModelNotFound):
        await _run(dispatcher, model="zzz")
    with pytest.raises(InvalidRequest, match="1024"):
        await _run(dispatcher, max_tokens=5000)
    dispatcher, _, _ = _setup({})
    with pytest.raises(NoCapacity):
        await _run(dispatcher)


async def test_every_node_full_is_429_not_a_failure() -> None:
    from tierflow.runtime.errors import RateLimited

    dispatcher, transport, _ = _setup({"a": rejects("queue_full", True), "b": rejects("queue_full", True)})
    with pytest.raises(RateLimited) as err:
        await _run(dispatcher)
    assert err.value.http_status == 429 and err.value.retry_after >= 1 and len(transport.opened) == 2


async def test_the_session_and_placement_are_recorded() -> None:
    dispatcher, _, _ = _setup({"a": ok(1), "b": ok(1)})
    params = GenerateParams(request_id="r", model="m", prompt_token_ids=[1, 2, 3], max_tokens=4, api="chat", user="agent-7")
    for expected_nodes in (1, 1):
        record = RequestRecord(request_id="r", api="chat", arrived=100.0)
        [e async for e in dispatcher.generate(params, record)]
        assert record.session and record.session_nodes == expected_nodes and record.placement == "least-loaded"


async def test_admission_refuses_at_the_door_and_every_way_out_releases() -> None:
    from tierflow.placement.admission import Admission, AdmissionConfig
    from tierflow.runtime.errors import RateLimited

    dispatcher, transport, _ = _setup({"a": ok(2), "b": lost_before_tokens})
    admission = Admission(AdmissionConfig(max_queue_factor=0.0))
    admission.set_capacity("m", 1)
    dispatcher._admission = admission
    params = GenerateParams(request_id="r", model="m", prompt_token_ids=[1, 2, 3], max_tokens=4, api="chat")
    first = dispatcher.generate(params, RequestRecord(request_id="r", api="chat", arrived=100.0))
    await anext(first)  # holds the model's one slot
    with pytest.raises(RateLimited) as err:
        await _run(dispatcher)
    assert err.value.code == "overloaded" and err.value.retry_after >= 1 and "at capacity" in err.value.message
    opened = len(transport.opened)
    await first.aclose()  # the client went away: the slot comes back
    assert admission.stats("m").in_flight == 0
    await _run(dispatcher)  # and a failure before the first token, then success elsewhere, releases once
    assert admission.stats("m").in_flight == 0 and len(transport.opened) > opened


async def test_a_prefill_node_dying_moves_the_prefill_not_the_decode_node() -> None:
    """1 decode : 2 prefill: the decode node did nothing wrong, the next leg uses it again
    with the other prefill node (the failed one is not tried again for this request)."""
    def prefilled(req: messages.GenerateRequest) -> Script:
        return [messages.Finished(request_id=req.request_id, finish_reason="prefill", prompt_tokens=3, completion_tokens=0)]

    dispatcher, transport, nodes = _setup({"d": ok(2), "p1": lost_before_tokens, "p2": prefilled})
    nodes._decode.pop("p1"); nodes._decode.pop("p2")  # type: ignore[attr-defined]  # they are prefill nodes
    for i, node in enumerate(("p1", "p2")):
        nodes.apply(messages.NodeHeartbeat(node_id=node, role="prefill", deployment="d", models=[messages.ModelState(name="m")], queue_depth=i, max_batch=4, started_at=1.0), 100.0)
    nodes.apply(messages.NodeHeartbeat(node_id="d", deployment="d", models=[messages.ModelState(name="m")], max_batch=4, started_at=1.0), 100.0)
    dispatcher._models.put_deployment(registry.DeploymentRecord(  # type: ignore[attr-defined]
        name="d", bundle="b", models=[registry.BundleEntry(model="m", version="v1", config="ss1024-bs4")], mode="disaggregated", prefill_replicas=2,
    ))  # fmt: skip
    events, record = await _run(dispatcher)
    assert isinstance(events[-1], messages.Finished) and record.node == "d" and record.prefill_node == "p2"
    assert [node for node, _, _ in transport.opened] == ["p1", "p2", "d"]
    assert transport.opened[2][1].kv_source == "p2"
