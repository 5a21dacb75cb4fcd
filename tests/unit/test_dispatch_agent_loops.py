"""The agent-loop hook of the router's request path, with a scripted node behind the
NodeTransport port: the policy's word reaches the record, the header, the metrics, the
event callback and the gRPC status; a refused step never reaches a node."""

from __future__ import annotations

import random
from collections.abc import Mapping

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from tierflow.contracts import events, messages, registry
from tierflow.placement import LeastLoaded, SessionTable, TenantDirectory
from tierflow.placement.agent_loops import AgentLoopTracker
from tierflow.runtime.clock import VirtualClock
from tierflow.runtime.errors import PermissionDenied
from tierflow.services.router.dispatch import Dispatcher, GenerateParams, RequestRecord
from tierflow.services.router.grpc_api import error_status
from tierflow.services.router.metrics import RouterMetrics
from tierflow.services.router.openai_api import _record_headers
from tierflow.placement.tables import ModelTable, NodeTable


class _Stream:
    def __init__(self, script: list[messages.StreamEvent]) -> None:
        self._script = script
        self.link_broke = False

    def buffered(self) -> bool:
        return False

    async def next(self) -> messages.StreamEvent:
        return self._script.pop(0)

    async def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Transport:
    """Every request answered with two tokens."""

    def __init__(self) -> None:
        self.opened: list[messages.GenerateRequest] = []

    async def open(self, node_id: str, request: messages.GenerateRequest, headers: Mapping[str, str] | None, *, role: str = "decode") -> _Stream:
        self.opened.append(request)
        rid = request.request_id
        return _Stream([
            messages.Started(request_id=rid, tier="hbm", queue_time=0.0),
            messages.Tokens(request_id=rid, index=0, token_ids=[5, 6], text=" a b"),
            messages.Finished(request_id=rid, finish_reason="length", prompt_tokens=len(request.prompt_token_ids), completion_tokens=2),
        ])  # fmt: skip


POLICY = {"max_steps": 3, "action": "reject", "runaway": {"window": 2, "min_growth": 500, "min_repeated": 0.5, "action": "warn"}}


def _setup() -> tuple[Dispatcher, _Transport, TenantDirectory, CollectorRegistry, list[events.AgentLoopEvent]]:
    clock = VirtualClock(100.0)
    nodes = NodeTable()
    nodes.apply(messages.NodeHeartbeat(node_id="a", models=[messages.ModelState(name="m")], max_batch=4, started_at=1.0), clock.monotonic())
    models = ModelTable()
    models.put_model(registry.ModelRecord(name="m", versions=[registry.ModelVersionRecord(version="v1")], default_version="v1"))
    models.put_deployment(registry.DeploymentRecord(name="d", bundle="b", models=[registry.BundleEntry(model="m", version="v1", config="ss8192-bs4")]))
    tenants = TenantDirectory.from_config({"tenants": [{"name": "acme", "api_keys": ["sk-acme"], "agent_loops": POLICY}]})
    metrics_registry = CollectorRegistry()
    transport = _Transport()
    published: list[events.AgentLoopEvent] = []
    dispatcher = Dispatcher(
        nodes, models, transport, clock, RouterMetrics(metrics_registry), policy=LeastLoaded(), tenants=tenants,
        sessions=SessionTable(100), seed=0, agent_loops=AgentLoopTracker(), on_agent_loop=published.append,
    )  # fmt: skip
    return dispatcher, transport, tenants, metrics_registry, published


async def _step(dispatcher: Dispatcher, tenants: TenantDirectory, i: int, prompt: list[int], **kw: str) -> RequestRecord:
    """One step through `generate`; a refusal is recorded as the front doors record it."""
    params = GenerateParams(request_id=f"r{i}", model="m", prompt_token_ids=prompt, max_tokens=2, api="chat", tenant=tenants.authenticate("sk-acme"), **kw)  # type: ignore[arg-type]
    record = RequestRecord(request_id=params.request_id, api="chat", arrived=100.0)
    try:
        async for _ in dispatcher.generate(params, record):
            pass
    except PermissionDenied as exc:
        record.failed(exc)
        refusals[record.request_id] = exc.message
    return record


refusals: dict[str, str] = {}


async def test_a_runaway_session_is_warned_then_capped_and_each_says_so_once() -> None:
    dispatcher, transport, tenants, metrics, published = _setup()
    rng = random.Random(0)
    history = [rng.randrange(50_000) for _ in range(2048)]
    records = []
    for i in range(5):  # prompts of 2048, 3072, 4096, 5120, 6144 tokens, each re-sending the last
        records.append(await _step(dispatcher, tenants, i, list(history), session_header="agent-1"))
        history += [rng.randrange(50_000) for _ in range(1024)]
    assert [r.agent_loop.split(";")[0] for r in records] == ["", "", "runaway", "max_steps", "max_steps"]
    assert records[2].outcome == "ok" and records[2].agent_loop.startswith("runaway; action=warn; steps=3; tokens=")
    assert ("x-tierflow-agent-loop", records[2].agent_loop) in _record_headers(records[2])
    assert all(h != "x-tierflow-agent-loop" for h, _ in _record_headers(records[0]))
    capped = records[3]
    assert (capped.status, capped.error) == (403, "agent_loop_limit") and len(transport.opened) == 3  # refused at the door
    assert "agent_loops.max_steps is 3 and this would be step 4" in refusals["r3"]
    assert [(e.kind, e.limit, e.action, e.steps, e.session, e.request_id) for e in published] == [
        ("flagged", "runaway", "warn", 3, "acme/agent-1", "r2"), ("capped", "max_steps", "reject", 4, "acme/agent-1", "r3"),
    ]  # fmt: skip
    assert published[0].repeated >= 0.5 and published[0].growth == pytest.approx(1024)
    sample = metrics.get_sample_value
    assert sample("tierflow_router_agent_loop_sessions_flagged_total", {"tenant": "acme", "policy": "runaway", "action": "warn"}) == 1
    assert sample("tierflow_router_agent_loop_sessions_flagged_total", {"tenant": "acme", "policy": "max_steps", "action": "reject"}) == 1
    assert sample("tierflow_router_agent_loop_refused_total", {"tenant": "acme", "policy": "max_steps", "action": "reject"}) == 2
    assert sample("tierflow_router_agent_loop_sessions") == 1
    # Completions are counted at settle: three steps, their prompts and two tokens each.
    assert dispatcher._loops.snapshot("acme/agent-1") == {"steps": 3, "tokens": 2048 + 3072 + 4096 + 3 * 2, "peak": 4096}


async def test_requests_outside_a_session_are_not_tracked() -> None:
    dispatcher, transport, tenants, metrics, published = _setup()
    for i in range(6):
        record = await _step(dispatcher, tenants, i, list(range(600 * (i + 1))))
        assert record.outcome == "ok" and record.agent_loop == ""
    assert len(dispatcher._loops) == 0 and published == []


def test_the_grpc_status_of_a_cap_is_permission_denied_with_the_code_as_reason() -> None:
    for code in ("agent_loop_limit", "summarization_required"):
        status = error_status(PermissionDenied("stopped", code=code))
        assert status.code == grpc.StatusCode.PERMISSION_DENIED
        decoded = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
        info = error_details_pb2.ErrorInfo()
        assert decoded.details[0].Unpack(info) and info.reason == code and info.metadata["http_status"] == "403"
        assert len(decoded.details) == 1  # no RetryInfo: retrying does not help


async def test_events_are_published_off_the_request_path_on_the_tenants_subject() -> None:
    import asyncio

    from tierflow.services.router.agent_loop_events import AgentLoopEvents

    sent: list[tuple[str, bytes]] = []

    class _Nats:
        async def publish(self, subject: str, data: bytes) -> None:
            await asyncio.sleep(0)
            sent.append((subject, data))

    publisher = AgentLoopEvents(_Nats(), "r1", limit=2)
    event = events.AgentLoopEvent(kind="capped", tenant="acme.eu", session="acme.eu/s", limit="max_steps", action="reject",
                                  steps=4, tokens=9000, prompt_tokens=3000, growth=1000.0, repeated=0.75)  # fmt: skip
    for _ in range(3):
        publisher.note(event)  # returns at once; the third is over the bound
    assert sent == [] and publisher.dropped == 1
    await publisher.close()
    assert [subject for subject, _ in sent] == ["tierflow.events.agent_loop.acme_deu"] * 2
    assert events.agent_loop_decoder.decode(sent[0][1]).router_id == "r1"
