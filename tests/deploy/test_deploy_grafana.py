"""The Grafana dashboard: well-formed, every query valid PromQL, and covering what the issue asks.

That every metric it names is one the services really expose is checked against a
running fabric in tests/fabric/test_fabric_dashboard.py; here is everything that
needs no fabric.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tierflow.json"
QUANTILES = ("0.5", "0.95", "0.99")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _sections(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(row, panels under it) in order; panels of an uncollapsed row follow it at top level."""
    out: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.append((panel, list(panel.get("panels", []))))
        else:
            assert out, f"panel {panel['title']!r} comes before any row"
            out[-1][1].append(panel)
    return out


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for _, panels in _sections(dashboard) for p in panels for t in p["targets"]]


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for _, panels in _sections(dashboard) for p in panels] + [r["id"] for r, _ in _sections(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for _, panels in _sections(dashboard):
        for p in panels:
            pos = p["gridPos"]
            assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], f"{p['title']} has no query"
            for t in p["targets"]:
                assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]


def test_template_variables_for_model_tenant_and_node(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "tenant", "node"):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"], name
        assert re.fullmatch(rf"label_values\(\w+, {name}\)", var["definition"]), var["definition"]
        assert var["query"]["query"] == var["definition"]


def test_a_row_per_model_tenant_and_node_filtered_by_its_variable(dashboard: dict[str, Any]) -> None:
    repeated = {row.get("repeat"): panels for row, panels in _sections(dashboard) if row.get("repeat")}
    assert set(repeated) == {"model", "tenant", "node"}
    for var, panels in repeated.items():
        assert len(panels) >= 6, f"the {var} row is too thin"
        for p in panels:
            for t in p["targets"]:
                assert f"${var}" in t["expr"], f"{var} row, panel {p['title']!r}: query ignores ${var}"


def test_the_dashboard_shows_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(_exprs(dashboard))
    for histogram in ("tierflow_time_to_first_token_seconds", "tierflow_inter_token_latency_seconds", "tierflow_e2e_request_latency_seconds"):
        for q in QUANTILES:
            assert re.search(rf"histogram_quantile\({q}, sum by \(le[^)]*\) \(rate\({histogram}_bucket\{{", exprs), f"p{q} of {histogram}"
    for needle in (
        "tierflow_requests_total", "tierflow_request_errors_total",  # request rate and errors
        "tierflow_router_prompt_tokens_total", "tierflow_router_generation_tokens_total",  # tokens in / out
        "tierflow_num_requests_running", "tierflow_num_requests_waiting", "tierflow_kv_cache_usage_perc",
        "tierflow_prefix_cache_hits_total", "tierflow_prefix_cache_queries_total", "tierflow_model_tier",
        "tierflow_router_retries_total", "tierflow_routing_decisions_total", "tierflow_autoscaler_desired_replicas",
        "tierflow_node_energy_joules_total", "tierflow_node_power_watts",  # energy (issue 19)
    ):  # fmt: skip
        assert needle in exprs, f"no panel shows {needle}"


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, Grafana's variables substituted."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    queries = _exprs(dashboard) + [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = []
    for i, query in enumerate(queries):
        expr = query.replace("$__rate_interval", "1m")
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        if expr.startswith("label_values("):  # Grafana's function: check the metric part
            expr = expr[len("label_values(") :].split(",")[0]
        rules.append({"record": f"tierflow:dashboard_query:{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
