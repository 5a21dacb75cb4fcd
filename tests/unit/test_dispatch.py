"""The router's request path with scripted nodes behind the NodeTransport port.

The NATS adapter is exercised by the whole-fabric tests; here the port lets each
failure mode be staged exactly (the httpx MockTransport pattern).
"""

from __future__ import annotations

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

Script = list[messages.StreamEvent | NodeLost]


class ScriptedStream:
    def __init__(self, node_id: str, script: Script) -> None:
        self.node_id = node_id
        self._script = list(script)
        self.cancelled = False
        self.closed = False

    async def next(self) -> messages.StreamEvent:
        item = self._script.pop(0)
        if isinstance(item, NodeLost):
            raise item
        return item

    async def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        self.closed = True


class ScriptedTransport:
    def __init__(self, behaviour: dict[str, Callable[[messages.GenerateRequest], Script]]) -> None:
        self.behaviour = behaviour
        self.opened: list[tuple[str, messages.GenerateRequest, ScriptedStream]] = []

    async def open(self, node_id: str, request: messages.GenerateRequest, headers: Mapping[str, str] | None, *, role: str = "decode") -> ScriptedStream:
        stream = ScriptedStream(node_id, self.behaviour[node_id](request))
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


def _setup(behaviour: dict[str, Callable[[messages.GenerateRequest], Script]]) -> tuple[Dispatcher, ScriptedTransport, NodeTable]:
    clock = VirtualClock(100.0)
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
        policy=LeastLoaded(), tenants=load_router_config("").tenants, sessions=SessionTable(100), seed=0,
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


async def test_node_lost_before_first_token_retries_elsewhere_and_marks_it() -> None:
    dispatcher, transport, nodes = _setup({"a": lost_before_tokens, "b": ok(2)})
    events, record = await _run(dispatcher)
    assert record.nodes_tried == ["a", "b"] and record.node == "b" and len(events) == 3
    assert [r.attempt for _, r, _ in transport.opened] == [1, 2]
    assert transport.opened[0][2].cancelled
    assert [n.node_id for n in nodes.views if n.suspect_until > 100.0] == ["a"]


async def test_retryable_failure_moves_on_but_client_errors_do_not() -> None:
    dispatcher, _, _ = _setup({"a": rejects("queue_full", True), "b": ok(1)})
    _, record = await _run(dispatcher)
    assert record.nodes_tried == ["a", "b"]
    dispatcher, transport, _ = _setup({"a": rejects("context_length_exceeded", False), "b": ok(1)})
    with pytest.raises(InvalidRequest):
        await _run(dispatcher)
    assert len(transport.opened) == 1


async def test_node_lost_after_first_token_is_a_clear_error_not_a_replay() -> None:
    dispatcher, transport, _ = _setup({"a": lost_after_tokens, "b": ok(2)})
    with pytest.raises(NodeFailure, match="incomplete"):
        await _run(dispatcher)
    assert len(transport.opened) == 1


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
