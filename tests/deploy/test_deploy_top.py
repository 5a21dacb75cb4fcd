"""`tierflow top` without a fabric: rates from two scrapes, and what a frame shows.

Against a running fabric it is exercised in tests/fabric/test_fabric_dashboard.py.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from tierflow.cli.top import FabricView, ModelTotals, RouterTotals, parse_router_totals, rates_between, render
from tierflow.contracts import messages
from tierflow.services.router.metrics import RouterMetrics


def _scrape(metrics: RouterMetrics, registry: CollectorRegistry, at: float) -> RouterTotals:
    return parse_router_totals(generate_latest(registry).decode(), at)


def test_totals_come_from_the_routers_own_exposition() -> None:
    registry = CollectorRegistry()
    m = RouterMetrics(registry)
    m.requests.labels("llama", "v1", "acme", "ok").inc(3)
    m.requests.labels("llama", "v2", "other", "ok").inc(1)
    m.requests.labels("llama", "v1", "acme", "error").inc(2)
    m.requests.labels("llama", "v1", "acme", "cancelled").inc(1)
    m.prompt_tokens.labels("llama", "v1", "acme").inc(100)
    m.completion_tokens.labels("llama", "v1", "acme").inc(400)
    m.in_flight.set(2)
    totals = _scrape(m, registry, 10.0)
    assert totals.models["llama"] == ModelTotals(requests=7, errors=2, prompt_tokens=100, generation_tokens=400)
    assert totals.in_flight == 2


def test_rates_are_deltas_per_second_and_survive_a_router_restart() -> None:
    before = RouterTotals(at=10.0, models={"a": ModelTotals(requests=10, prompt_tokens=1000, generation_tokens=50)})
    after = RouterTotals(at=12.0, models={"a": ModelTotals(requests=30, prompt_tokens=1400, generation_tokens=250), "b": ModelTotals(requests=4)})
    rates = rates_between(before, after)
    assert rates.window_s == 2.0
    assert rates.models["a"] == ModelTotals(requests=10, prompt_tokens=200, generation_tokens=100)
    assert rates.models["b"].requests == 2  # new model: counted from zero
    assert rates.total.requests == 12
    restarted = RouterTotals(at=14.0, models={"a": ModelTotals(requests=6)})
    assert rates_between(after, restarted).models["a"].requests == 3  # counter reset: from zero, never negative


def _beat(node_id: str, *, role: str = "decode", tiers: dict[str, str], **kw: object) -> messages.NodeHeartbeat:
    models = [messages.ModelState(name=n, tier=t) for n, t in tiers.items()]  # type: ignore[arg-type]
    return messages.NodeHeartbeat(node_id=node_id, role=role, deployment="default", region="eu", models=models, max_batch=8, **kw)  # type: ignore[arg-type]


def test_a_frame_shows_nodes_tiers_states_and_where_models_are_hot() -> None:
    view = FabricView(nats_url="nats://x:4222", router_url="http://x:8000")
    view.on_heartbeat(_beat("decode-0", tiers={"llama": "hbm", "gpt": "ddr"}, queue_depth=3, running=5, kv_usage=0.42), now=100.0)
    view.on_heartbeat(_beat("decode-1", tiers={"llama": "ddr", "gpt": "hbm"}, cordoned=True), now=100.0)
    view.on_heartbeat(_beat("decode-2", tiers={"llama": "hbm"}), now=90.0)  # silent for 10 intervals
    view.on_scrape(RouterTotals(at=99.0, models={"llama": ModelTotals(requests=10)}))
    view.on_scrape(RouterTotals(at=100.0, models={"llama": ModelTotals(requests=15, generation_tokens=640)}))
    console = Console(width=200, record=True, color_system=None)
    console.print(render(view, now=100.5))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert "llama (hbm), gpt (ddr)" in rows["decode-0"] and "5/8" in rows["decode-0"] and "42%" in rows["decode-0"] and "ready" in rows["decode-0"]
    assert "cordoned" in rows["decode-1"]
    assert "lost" in rows["decode-2"]
    hot, warm = rows["llama"].split("│")[2:4]
    assert hot.strip() == "decode-0" and warm.strip() == "decode-1"  # the lost node is not counted
    assert "5.0" in rows["llama"] and "640" in rows["llama"]
    assert "5.0 req/s" in text and "640 tok/s out" in text


def test_a_frame_says_when_the_router_cannot_be_scraped() -> None:
    view = FabricView(nats_url="nats://x:4222", router_url="http://x:8000", router_problem="Connection refused")
    console = Console(width=200, record=True, color_system=None)
    console.print(render(view, now=0.0))
    assert "router metrics unavailable (Connection refused)" in console.export_text()
