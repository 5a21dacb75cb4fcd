"""The dispatcher's books: each admitted request reserves its tokens, settles them once to
what it is charged, and leaves one usage record, whatever its outcome (scripted nodes
behind the NodeTransport port, as in test_dispatch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import aclosing

import pytest
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages, registry
from tierflow.placement import LeastLoaded, SessionTable, TenantDirectory
from tierflow.placement.tables import ModelTable, NodeTable
from tierflow.runtime.clock import VirtualClock
from tierflow.runtime.errors import NodeFailure, RateLimited
from tierflow.services.router.dispatch import Dispatcher, GenerateParams, RequestRecord
from tierflow.services.router.metrics import RouterMetrics
from tierflow.services.router.transport import NodeLost

Script = list[messages.StreamEvent | NodeLost]
PROMPT = [1, 2, 3, 4, 5]


class _Stream:
    def __init__(self, script: Script) -> None:
        self._script = list(script)
        self.link_broke = False

    def buffered(self) -> bool:
        return False

    async def next(self) -> messages.StreamEvent:
        item = self._script.pop(0)
        if isinstance(item, NodeLost):
            raise item
        return item

    async def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Transport:
    def __init__(self, script: Callable[[messages.GenerateRequest], Script]) -> None:
        self.script = script
        self.requests: list[messages.GenerateRequest] = []

    async def open(self, node_id: str, request: messages.GenerateRequest, headers: Mapping[str, str] | None, *, role: str = "decode") -> _Stream:
        self.requests.append(request)
        return _Stream(self.script(request))


def _tokens(req: messages.GenerateRequest, n: int) -> Script:
    return [messages.Tokens(request_id=req.request_id, index=i, token_ids=[i], text=f" t{i}") for i in range(n)]


def finishes(n: int) -> Callable[[messages.GenerateRequest], Script]:
    return lambda req: [*_tokens(req, n), messages.Finished(request_id=req.request_id, finish_reason="length", prompt_tokens=len(req.prompt_token_ids),
                                                            completion_tokens=n, cached_tokens=2, energy_j=1.5)]  # fmt: skip


def fails_after(n: int) -> Callable[[messages.GenerateRequest], Script]:
    return lambda req: [*_tokens(req, n), messages.Failed(request_id=req.request_id, code="engine_error", message="boom", retryable=False)]


class _Books:
    def __init__(self, script: Callable[[messages.GenerateRequest], Script], **policy: object) -> None:
        self.clock = VirtualClock(1000.0)
        nodes = NodeTable()
        nodes.apply(messages.NodeHeartbeat(node_id="a", models=[messages.ModelState(name="m")], max_batch=4, started_at=1.0), self.clock.monotonic())
        models = ModelTable()
        models.put_model(registry.ModelRecord(name="m", versions=[registry.ModelVersionRecord(version="v1")], default_version="v1"))
        models.put_deployment(registry.DeploymentRecord(name="d", bundle="b", models=[registry.BundleEntry(model="m", version="v1", config="ss1024-bs4")]))
        self.tenants = TenantDirectory.from_config({"tenants": [{"name": "acme", "api_keys": ["k"], **policy}]})
        self.tenant = self.tenants.tenants["acme"]
        self.transport = _Transport(script)
        self.usage: list[tuple[str, str, tuple[int, int, int], float]] = []
        self.dispatcher = Dispatcher(
            nodes, models, self.transport, self.clock, RouterMetrics(CollectorRegistry()),  # type: ignore[arg-type]
            policy=LeastLoaded(), tenants=self.tenants, sessions=SessionTable(100), seed=0, resume_wait=0.0,
            on_usage=lambda r: self.usage.append((r.request_id, r.outcome, r.charged(), r.admitted_at)),
        )  # fmt: skip

    def params(self, request_id: str = "req1", max_tokens: int | None = 100) -> tuple[GenerateParams, RequestRecord]:
        params = GenerateParams(request_id=request_id, model="m", prompt_token_ids=list(PROMPT), max_tokens=max_tokens, api="chat", tenant=self.tenant)
        return params, RequestRecord(request_id=request_id, api="chat", arrived=self.clock.monotonic())

    @property
    def quota(self):  # type: ignore[no-untyped-def]
        assert self.tenant.quota is not None
        return self.tenant.quota


async def test_a_finished_request_settles_to_its_usage_and_leaves_one_record() -> None:
    books = _Books(finishes(3), token_quota=1000)
    params, record = books.params()
    events = books.dispatcher.generate(params, record)
    first = await anext(events)
    assert type(first) is messages.Tokens and books.quota.held(1000.0) == 105  # prompt 5 + max_tokens 100, held while it runs
    rest = [e async for e in events]
    assert type(rest[-1]) is messages.Finished
    assert books.quota.held(1000.0) == 0 and books.quota.used(1000.0) == 8
    assert books.usage == [("req1", "ok", (5, 2, 3), 1000.0)]


async def test_a_front_door_that_stops_at_finished_books_it_at_once() -> None:
    """The encoders' front door breaks out at Finished and leaves the generator open: the
    books are closed before it sees Finished, and closing it later adds nothing."""
    books = _Books(finishes(2), token_quota=1000)
    params, record = books.params()
    events = books.dispatcher.generate(params, record)
    async for event in events:
        if type(event) is messages.Finished:
            break
    assert books.usage == [("req1", "ok", (5, 2, 2), 1000.0)] and books.quota.used(1000.0) == 7
    await events.aclose()
    assert len(books.usage) == 1 and books.quota.used(1000.0) == 7


async def test_a_failure_after_tokens_is_charged_what_the_client_got_and_recorded_once() -> None:
    books = _Books(fails_after(4), token_quota=1000)
    params, record = books.params()
    with pytest.raises(NodeFailure):
        async with aclosing(books.dispatcher.generate(params, record)) as events:
            async for _ in events:
                pass
    assert books.usage == [("req1", "error", (5, 0, 4), 1000.0)] and record.status == 502
    assert books.quota.held(1000.0) == 0 and books.quota.used(1000.0) == 9


async def test_a_failure_before_any_output_costs_nothing_but_is_recorded() -> None:
    books = _Books(fails_after(0), token_quota=1000, rate_limit_rps=10)
    params, record = books.params()
    with pytest.raises(NodeFailure):
        async for _ in books.dispatcher.generate(params, record):
            pass
    assert books.usage == [("req1", "error", (0, 0, 0), 1000.0)]  # an admitted request: a rate token was taken
    assert books.quota.held(1000.0) == 0 and books.quota.used(1000.0) == 0


async def test_a_client_going_away_is_cancelled_and_charged_what_it_received() -> None:
    books = _Books(finishes(10), token_quota=1000)
    params, record = books.params()
    events = books.dispatcher.generate(params, record)
    for _ in range(3):
        await anext(events)
    await events.aclose()
    assert books.usage == [("req1", "cancelled", (5, 0, 3), 1000.0)] and record.status == 499
    assert books.quota.held(1000.0) == 0 and books.quota.used(1000.0) == 8


async def test_without_max_tokens_the_completion_is_clamped_to_what_the_quota_has_left() -> None:
    books = _Books(finishes(1), token_quota=50)
    params, record = books.params(max_tokens=None)  # the model's whole context (1024 - 5) would not fit
    assert [type(e).__name__ async for e in books.dispatcher.generate(params, record)][-1] == "Finished"
    assert books.transport.requests[0].max_tokens == 45 and record.max_tokens == 45
    params, record = books.params("req2", max_tokens=40)  # asked for more than is left (45 > 44): refused, nothing taken
    with pytest.raises(RateLimited) as err:
        async for _ in books.dispatcher.generate(params, record):
            pass
    assert err.value.code == "insufficient_quota" and "44 of 50 tokens remain" in err.value.message
    assert [u[0] for u in books.usage] == ["req1"] and books.quota.held(1000.0) == 0
