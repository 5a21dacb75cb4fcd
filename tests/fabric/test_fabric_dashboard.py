"""Metrics as Prometheus sees them, from a fabric started by `tierflow up`.

- every service's /metrics answers, and the Grafana dashboard names only metrics (and
  labels) that some service really exposes: it cannot silently chart nothing;
- after N requests the latency histograms and the nodes' request counters rose by
  exactly N, per model;
- `tierflow top --once` shows the fabric's nodes and models, and fails clearly without one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tierflow.runtime.nats_server import free_port, http_get

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tierflow.json"
SERVICES = ("router", "model-registry", "autoscaler", "prefill-0", "decode-0", "decode-1")
# Labels Prometheus adds at scrape time (deploy/prometheus/*.yml), not the services.
SCRAPE_LABELS = {"job", "instance", "service", "pod"}
_METRICS_LINE = re.compile(r"metrics on http://[^:/]+:(\d+)/metrics")


# --------------------------------------------------------------------------- PromQL names


_NOT_METRICS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (not functions, labels, keywords or numbers).

    Label matchers, ranges and label lists are removed first, so what remains are
    names: a name followed by `(` is a function or aggregation, the rest are metrics.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == "." or s[m.end() :].lstrip().startswith("("):
            continue  # part of a number (1e-9), or a function / aggregation
        if m.group() not in _NOT_METRICS:
            names.add(m.group())
    return names


def promql_selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names it matches on) for every `metric{...}` selector in `expr`."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return [
        (m.group(1), set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2))))
        for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", s)
    ]


def promql_grouping_labels(expr: str) -> set[str]:
    """Label names in `by (...)`, `without (...)`, `on (...)` and the like."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    lists = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s)
    return {label.strip() for group in lists for label in group.split(",") if label.strip()}


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"] + [p for r in dashboard["panels"] for p in r.get("panels", [])]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(variable, metric, label) of every `label_values(metric, label)` template variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var.get("definition", ""))
        if m:
            out.append((var["name"], m.group(1), m.group(2)))
    return out


def dashboard_metric_names() -> dict[str, set[str]]:
    """Every metric the dashboard reads -> the panels (or variables) reading it."""
    where: dict[str, set[str]] = {}
    for title, expr in dashboard_queries():
        for name in promql_metric_names(expr):
            where.setdefault(name, set()).add(title)
    for var, metric, _ in dashboard_variables():
        where.setdefault(metric, set()).add(f"variable ${var}")
    return where


def test_promql_metric_names_finds_metrics_and_nothing_else() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(tierflow_ttft_bucket{model=~"$model", tenant="a{b}"}[$__rate_interval])))'
    assert promql_metric_names(expr) == {"tierflow_ttft_bucket"}
    expr = "sum(rate(a_total[5m])) / clamp_min(sum without (x) (b_total offset 5m), 1e-9) > bool 0 and on (node) c"
    assert promql_metric_names(expr) == {"a_total", "b_total", "c"}
    expr = 'sum by (model, le) (rate(x_bucket{model=~"$m", tenant!="a,b{c}"}[1m])) / on (node) y{node="n"}'
    assert promql_selector_labels(expr) == [("x_bucket", {"model", "tenant"}), ("y", {"node"})]
    assert promql_grouping_labels(expr) == {"model", "le", "node"}


# --------------------------------------------------------------------------- scraping


def metrics_ports(fabric) -> dict[str, int]:  # noqa: ANN001 (the fixture's Fabric)
    """Each service's /metrics port: the router's HTTP port, the others' from their start-up log line."""
    ports = {"router": fabric.http_port}
    for name in SERVICES[1:]:
        found = _METRICS_LINE.search(fabric.log(name))
        assert found, f"{name} logged no `metrics on ...` line; is it started with --metrics-port?"
        ports[name] = int(found.group(1))
    return ports


def scrape(port: int) -> str:
    reply = asyncio.run(http_get("127.0.0.1", port, "/metrics", timeout=3.0))
    assert reply.status == 200, f"/metrics on {port}: HTTP {reply.status}"
    return reply.body.decode()


def exposed_names(text: str) -> set[str]:
    """Every series name this exposition has or will have (a labelled metric with no
    observations yet shows only its HELP/TYPE lines: names follow from its type)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}  # fmt: skip
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + sfx for sfx in suffixes.get(family.type, ("",))}
    return names


def series_labels(text: str) -> dict[str, set[str]]:
    """Label names of every series present in the exposition (metrics not observed yet are absent)."""
    labels: dict[str, set[str]] = {}
    for s in samples(text):
        labels.setdefault(s.name, set()).update(s.labels)
    return labels


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def by_model(all_samples: list[Sample], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in all_samples:
        if s.name == name:
            out[s.labels["model"]] = out.get(s.labels["model"], 0.0) + s.value
    return out


def send_traffic(fabric, plan: dict[str, int]) -> None:  # noqa: ANN001
    """`plan[model]` requests per model, through both APIs, streamed and not."""
    import openai

    client = openai.OpenAI(base_url=fabric.base_url, api_key="dashboard", max_retries=0)
    exact = {"ignore_eos": True}  # exactly max_tokens, whatever the sampled text
    i = 0
    for model, count in plan.items():
        for _ in range(count):
            i += 1
            content = f"metrics check {i}"
            if i % 3 == 0:
                stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=4,
                                                        stream=True, stream_options={"include_usage": True}, extra_body=exact)  # fmt: skip
                assert any(chunk.usage for chunk in stream)
            elif i % 3 == 1:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=4, extra_body=exact)
                assert r.usage is not None and r.usage.completion_tokens == 4
            else:
                c = client.completions.create(model=model, prompt=content, max_tokens=4, extra_body=exact)
                assert c.usage is not None and c.usage.completion_tokens == 4


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until `check()`: a stream's last metric is recorded just after its last byte is sent."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------- tests


@pytest.mark.fabric
def test_dashboard_reads_only_metrics_the_services_expose(fabric) -> None:  # noqa: ANN001
    send_traffic(fabric, {"llama-3.1-8b": 2, "gpt-oss-20b": 1})
    exposed: set[str] = set()
    labels: dict[str, set[str]] = {}
    for name, port in metrics_ports(fabric).items():
        text = scrape(port)
        assert "process_cpu_seconds_total" in text, f"{name}: not a prometheus-client exposition"
        exposed |= exposed_names(text)
        for series, names in series_labels(text).items():
            labels.setdefault(series, set()).update(names)
    wanted = dashboard_metric_names()
    assert len(wanted) >= 15, "the dashboard reads suspiciously few metrics"
    missing = {name: sorted(panels) for name, panels in wanted.items() if name not in exposed}
    assert not missing, f"the dashboard reads metrics no service exposes: {missing}"

    # Labels too, where the series exist already (a metric never observed has no labels to compare).
    problems = []
    for title, expr in dashboard_queries():
        for metric, used in promql_selector_labels(expr):
            if metric in labels and (unknown := used - labels[metric] - SCRAPE_LABELS):
                problems.append(f"{title!r}: {metric} has no label {sorted(unknown)}")
        metrics = promql_metric_names(expr)
        if metrics <= labels.keys():
            known = set().union(*(labels[m] for m in metrics)) | SCRAPE_LABELS
            if unknown := promql_grouping_labels(expr) - known:
                problems.append(f"{title!r}: groups by {sorted(unknown)}, which none of {sorted(metrics)} has")
    for var, metric, label in dashboard_variables():
        if metric in labels and label not in labels[metric]:
            problems.append(f"variable ${var}: {metric} has no label {label!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.fabric
def test_histograms_and_node_counters_count_exactly_the_requests_sent(fabric) -> None:  # noqa: ANN001
    plan = {"llama-3.1-8b": 4, "gpt-oss-20b": 2}
    ports = metrics_ports(fabric)
    nodes = [n for n in SERVICES if n.startswith(("decode-", "prefill-"))]
    watched = ("tierflow_e2e_request_latency_seconds_count", "tierflow_time_to_first_token_seconds_count")

    def snapshot() -> dict[str, dict[str, float]]:
        router = samples(scrape(ports["router"]))
        node_samples = [s for n in nodes for s in samples(scrape(ports[n]))]
        snap = {name: by_model(router, name) for name in watched}
        snap["tierflow_node_requests_total"] = by_model(node_samples, "tierflow_node_requests_total")
        return snap

    before = snapshot()
    send_traffic(fabric, plan)
    deltas: dict[str, dict[str, float]] = {}

    def settled() -> bool:
        after = snapshot()
        deltas.clear()
        for metric, values in after.items():
            deltas[metric] = {m: values.get(m, 0.0) - before[metric].get(m, 0.0) for m in plan}
        return all(deltas[metric] == {m: float(n) for m, n in plan.items()} for metric in deltas)

    eventually(settled)
    for metric, per_model in deltas.items():
        assert per_model == {m: float(n) for m, n in plan.items()}, f"{metric} rose by {per_model}, expected {plan}"


def _top(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", **(env or {})}  # rich wraps at 80 columns without a terminal
    return subprocess.run([sys.executable, "-m", "tierflow", "top", "--once", *args], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.fabric
def test_top_once_shows_nodes_models_and_rates(fabric) -> None:  # noqa: ANN001
    out = _top("--nats-url", fabric.nats_url, "--router", f"http://{fabric.host}:{fabric.http_port}", env=fabric.nats_env())
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("decode-0", "decode-1", "prefill-0", "llama-3.1-8b", "gpt-oss-20b", "(hbm)", "ready", "rates over"):
        assert word in out.stdout, f"{word!r} missing from:\n{out.stdout}"
    for service in ("router", "model-registry", "autoscaler", "decode-node", "prefill-node"):
        assert service in out.stdout.split("services:", 1)[1].split("\n", 1)[0]


def test_top_without_a_fabric_fails_clearly() -> None:
    out = _top("--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert out.returncode != 0
    assert "not running" in out.stdout + out.stderr and "cannot reach NATS" in out.stdout + out.stderr
