"""vLLM's own Grafana dashboard reads the fabric (issue 20).

`tests/fixtures/vllm-grafana.json` is vLLM's published dashboard, unchanged (its source
is in the README beside it). After some traffic through a fabric started by `tierflow up`,
every metric its PromQL reads is exposed by the router or a node, with the labels it
selects and groups by (`model_name`, `le`, `finished_reason`), and its `$model_name`
variable lists the models served. Each `vllm:*` name comes from one tier only, so the
dashboard's sums across targets count each request once: after N requests per model the
router's and the nodes' vLLM histograms rose by exactly N.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_fabric_dashboard import (
    SCRAPE_LABELS,
    eventually,
    exposed_names,
    metrics_ports,
    promql_grouping_labels,
    promql_metric_names,
    promql_selector_labels,
    samples,
    scrape,
    send_traffic,
    series_labels,
)

VLLM_DASHBOARD = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-grafana.json"
PLAN = {"llama-3.1-8b": 3, "gpt-oss-20b": 2}


def vllm_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(VLLM_DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def vllm_variable_labels() -> list[str]:
    """Labels of the dashboard's `label_values(label)` variables (no metric named)."""
    dashboard = json.loads(VLLM_DASHBOARD.read_text())
    found = (re.fullmatch(r"label_values\((\w+)\)", var.get("definition", "")) for var in dashboard["templating"]["list"])
    return [m.group(1) for m in found if m]


def test_the_fixture_is_vllms_dashboard() -> None:
    names = {name for _, expr in vllm_queries() for name in promql_metric_names(expr)}
    assert len(names) >= 15 and all(name.startswith("vllm:") for name in names), sorted(names)
    assert vllm_variable_labels() == ["model_name"]


def _by_model_name(all_samples: list, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in all_samples:
        if s.name == name:
            out[s.labels["model_name"]] = out.get(s.labels["model_name"], 0.0) + s.value
    return out


@pytest.mark.fabric
def test_vllm_dashboard_finds_every_metric_it_queries(fabric) -> None:  # noqa: ANN001
    ports = metrics_ports(fabric)
    send_traffic(fabric, PLAN)
    exposed: dict[str, set[str]] = {}  # name -> services exposing it
    labels: dict[str, set[str]] = {}
    label_values: set[str] = set()
    for service, port in ports.items():
        text = scrape(port)
        for name in exposed_names(text):
            exposed.setdefault(name, set()).add(service)
        for series, names in series_labels(text).items():
            labels.setdefault(series, set()).update(names)
        label_values |= {s.labels["model_name"] for s in samples(text) if "model_name" in s.labels}

    wanted: dict[str, set[str]] = {}
    for title, expr in vllm_queries():
        for name in promql_metric_names(expr):
            wanted.setdefault(name, set()).add(title)
    missing = {name: sorted(panels) for name, panels in wanted.items() if name not in exposed}
    assert not missing, f"vLLM's dashboard reads metrics the fabric does not expose: {missing}"

    problems = []
    for title, expr in vllm_queries():
        for metric, used in promql_selector_labels(expr):
            if unknown := used - labels.get(metric, set()) - SCRAPE_LABELS:
                problems.append(f"{title!r}: {metric} has no series with label {sorted(unknown)}")
        known = set().union(*(labels.get(m, set()) for m in promql_metric_names(expr))) | SCRAPE_LABELS
        if unknown := promql_grouping_labels(expr) - known:
            problems.append(f"{title!r}: groups by {sorted(unknown)}, which its metrics lack")
    assert not problems, "\n".join(problems)
    assert set(PLAN) <= label_values, f"$model_name would list {sorted(label_values)}"

    # One tier per vllm:* name: a name the router and the nodes both exposed would be summed twice.
    nodes = {s for s in ports if s.startswith(("decode-", "prefill-"))}
    for name in (n for n in exposed if n.startswith("vllm:")):
        where = exposed[name]
        assert where <= {"router"} or where <= nodes, f"{name} is exposed by {sorted(where)}"


@pytest.mark.fabric
def test_vllm_histograms_count_each_request_once(fabric) -> None:  # noqa: ANN001
    ports = metrics_ports(fabric)
    nodes = [s for s in ports if s.startswith("decode-")]
    router_names = ("vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count", "vllm:request_generation_tokens_count")
    node_names = ("vllm:request_queue_time_seconds_count", "vllm:request_decode_time_seconds_count")

    def snapshot() -> dict[str, dict[str, float]]:
        router = samples(scrape(ports["router"]))
        on_nodes = [s for n in nodes for s in samples(scrape(ports[n]))]
        snap = {name: _by_model_name(router, name) for name in router_names}
        snap |= {name: _by_model_name(on_nodes, name) for name in node_names}
        snap["vllm:request_success_total"] = _by_model_name(router, "vllm:request_success_total")
        snap["vllm:generation_tokens_total"] = _by_model_name(router, "vllm:generation_tokens_total")
        return snap

    before = snapshot()
    send_traffic(fabric, PLAN)  # max_tokens=4, ignore_eos: 4 generation tokens a request
    expected = {name: {m: float(n) for m, n in PLAN.items()} for name in before}
    expected["vllm:generation_tokens_total"] = {m: 4.0 * n for m, n in PLAN.items()}
    deltas: dict[str, dict[str, float]] = {}

    def settled() -> bool:
        after = snapshot()
        deltas.clear()
        for name, values in after.items():
            deltas[name] = {m: values.get(m, 0.0) - before[name].get(m, 0.0) for m in PLAN}
        return deltas == expected

    eventually(settled)
    assert deltas == expected
