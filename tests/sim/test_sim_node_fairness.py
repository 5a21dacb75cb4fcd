"""A simulated node queues a call by its class, tenant and weight, as a live node queues a
GenerateRequest (tierflow.rdu.fairness), so a simulated tenant is scheduled as a live one."""

from __future__ import annotations

from types import SimpleNamespace

from sim_helpers import fleet_of
from test_sim_parts import PAIR

from tierflow.placement import Tenant
from tierflow.placement.tenants import TenantPolicy
from tierflow.rdu import RequestStarted
from tierflow.sim.calls import Call
from tierflow.sim.fleet import plan_deployments
from tierflow.sim.node import SimNode


def call(rid: str, tenant: Tenant, cls: str, max_tokens: int) -> Call:
    step = SimpleNamespace(model="small", max_tokens=max_tokens)
    c = Call(rid, None, step, 0.0, prompt_tokens=300, prompt_hashes=[hash((rid, i)) & (2**63 - 1) for i in range(300 // 64)])  # type: ignore[arg-type]
    c.tenant = tenant
    c.request_class = cls
    return c


def test_a_call_reaches_the_engine_with_its_class_tenant_and_weight() -> None:
    plan = next(p for p in plan_deployments(fleet_of(PAIR)) if p.name == "pair")
    node = SimNode(plan, "decode", "n0", 0.0)
    bulk = Tenant.from_policy(TenantPolicy(name="bulk"))
    chat = Tenant.from_policy(TenantPolicy(name="chat", weight=3.0, request_class="interactive"))
    for i in range(10):
        node.receive(call(f"b{i}", bulk, "batch", 400), 0.0)
    node.receive(call("i", chat, "interactive", 20), 0.001)
    r = node.engine._requests["i"]
    assert (r.rank, r.share.name, r.share.next_weight) == (0, "chat", 3.0)
    started: list[str] = []
    while (t := node.engine.next_event_time()) is not None and len(started) < 6:
        started += [e.request_id for e, _ in node.advance(t) if type(e) is RequestStarted]
    assert started[:4] == ["b0", "b1", "b2", "b3"] and started[4] == "i"  # ahead of b4..b9
