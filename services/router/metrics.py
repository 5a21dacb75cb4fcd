"""Router metrics: the client's view of latency, as `tierflow_*` and as vLLM's `vllm:*`.

The request-level `vllm:*` metrics (tierflow.runtime.vllm_metrics says which tier has
which) are recorded by the same calls as their `tierflow_*` twins: `labels()` of ttft,
itl, e2e and the token counters hands out a child that records to both, so the
dispatcher records once and the two can never disagree. `tierflow_*` keep finer buckets
at the fast end (the emulator streams tokens a few ms apart), extended to vLLM's top
bucket so long requests do not all land in +Inf; `vllm:*` use vLLM's buckets exactly.

Labels are bounded: model and version come from the registry, node from heartbeats,
tenant from configuration; nothing per request or per user ends up in a label. So each
labelled metric keeps the children it has handed out in a dict keyed by the label
tuple (`_Children`): prometheus-client's `labels()` converts and validates every value
and takes a lock on each call, several times per request on the router's path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tierflow.placement.admission import Admission
from tierflow.runtime import vllm_metrics as vllm

__all__ = ["RouterMetrics", "AdmissionCollector", "HttpServerCollector", "PrefixIndexCollector"]

_TTFT_BUCKETS = vllm.TIME_TO_FIRST_TOKEN_BUCKETS
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, *vllm.INTER_TOKEN_LATENCY_BUCKETS[1:])
_E2E_BUCKETS = (0.01, 0.05, 0.1, *vllm.REQUEST_LATENCY_BUCKETS)


class _Children:
    """A labelled metric whose `labels(*values)` is resolved once per label tuple; every
    other attribute is the metric's own. (Nothing on the router removes a label set.)"""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


class _Both:
    """One label set's child of a `tierflow_*` metric and of its `vllm:*` alias."""

    __slots__ = ("_ours", "_vllm")

    def __init__(self, ours: Any, alias: Any) -> None:
        self._ours = ours
        self._vllm = alias

    def observe(self, value: float) -> None:
        self._ours.observe(value)
        self._vllm.observe(value)

    def inc(self, amount: float = 1.0) -> None:
        self._ours.inc(amount)
        self._vllm.inc(amount)


class _Aliased(_Children):
    """A `tierflow_*` metric labelled (model, version, tenant) whose children also record
    to a `vllm:*` alias labelled by model_name alone."""

    __slots__ = ("_alias", "_alias_children")

    def __init__(self, metric: Any, alias: Any) -> None:
        super().__init__(metric)
        self._alias = alias
        self._alias_children: dict[str, Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            model = values[0]
            alias = self._alias_children.get(model)
            if alias is None:
                alias = self._alias_children[model] = self._alias.labels(model)
            child = self._children[values] = _Both(self._metric.labels(*values), alias)
        return child


class _VllmRequests:
    """vLLM's per-request counts that have no `tierflow_*` twin: finish reasons and token
    counts per request (vLLM's heatmaps of prompt and generation length)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        model = (vllm.MODEL_LABEL,)
        kw: dict[str, Any] = {"registry": registry}
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.", (*model, "finished_reason"), **kw)
        self.prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", model, buckets=vllm.REQUEST_TOKENS_BUCKETS, **kw)
        self.generation = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", model, buckets=vllm.REQUEST_TOKENS_BUCKETS, **kw)
        self.max_generation = Histogram(
            "vllm:request_max_num_generation_tokens", "Generation tokens of a request's longest choice.", model,
            buckets=vllm.REQUEST_TOKENS_BUCKETS, **kw)  # fmt: skip
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}

    def served(self, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """One request answered in full (the router's outcome "ok"); a request's choices are
        one stream here, so its longest choice is its completion."""
        key = (model, finish_reason)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.success.labels(model, finish_reason), self.prompt.labels(model),
                self.generation.labels(model), self.max_generation.labels(model),
            )  # fmt: skip
        success, prompt, generation, max_generation = children
        success.inc()
        prompt.observe(prompt_tokens)
        generation.observe(completion_tokens)
        max_generation.observe(completion_tokens)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        kw = {"registry": registry}
        labels = ("model", "version", "tenant")
        self.ttft = Histogram("tierflow_time_to_first_token_seconds", "Time to first token seen by the client", labels, buckets=_TTFT_BUCKETS, **kw)
        self.itl = Histogram("tierflow_inter_token_latency_seconds", "Time between streamed tokens", labels, buckets=_ITL_BUCKETS, **kw)
        self.e2e = Histogram("tierflow_e2e_request_latency_seconds", "Request latency end to end", labels, buckets=_E2E_BUCKETS, **kw)
        self.requests = Counter("tierflow_requests", "Requests answered, by outcome", (*labels, "outcome"), **kw)
        self.errors = Counter("tierflow_request_errors", "Requests that failed, by error type", ("model", "type"), **kw)
        self.prompt_tokens = Counter("tierflow_router_prompt_tokens", "Prompt tokens of served requests", labels, **kw)
        self.completion_tokens = Counter("tierflow_router_generation_tokens", "Tokens streamed to clients", labels, **kw)
        self.retries = Counter("tierflow_router_retries", "Attempts moved to another node before the first token", ("model", "reason"), **kw)
        self.migrations = Counter("tierflow_router_migrations", "Streams resumed on another node after tokens had gone out, by why the node's leg ended", ("model", "reason"), **kw)
        self.routing = Counter("tierflow_routing_decisions", "Placement decisions by reason (e.g. hbm+prefix+affinity)", ("model", "reason"), **kw)
        self.tiers = Counter("tierflow_model_tier_at_dispatch", "Where each request found its model on its node", ("model", "tier"), **kw)
        self.in_flight = Gauge("tierflow_router_requests_in_flight", "Requests the router is serving now", **kw)
        self.nodes = Gauge("tierflow_router_live_nodes", "Decode nodes heard from within 3 heartbeats", **kw)
        self.peers = Gauge("tierflow_router_peers", "Routers on NATS (this one included) that split the tenants' limits", **kw)
        self.heartbeats_rejected = Counter(
            "tierflow_router_heartbeats_rejected", "Node heartbeats not believed, by reason (tierflow.placement.heartbeats.REASONS)", ("reason",), **kw)
        model = (vllm.MODEL_LABEL,)
        aliases = {
            "ttft": Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", model, buckets=vllm.TIME_TO_FIRST_TOKEN_BUCKETS, **kw),
            "itl": Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", model, buckets=vllm.INTER_TOKEN_LATENCY_BUCKETS, **kw),
            "e2e": Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", model, buckets=vllm.REQUEST_LATENCY_BUCKETS, **kw),
            "prompt_tokens": Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", model, **kw),
            "completion_tokens": Counter("vllm:generation_tokens", "Number of generation tokens processed.", model, **kw),
        }
        self.vllm = _VllmRequests(registry)
        for name in ("ttft", "itl", "e2e", "requests", "errors", "prompt_tokens", "completion_tokens", "retries", "migrations", "routing", "tiers"):
            metric = getattr(self, name)
            setattr(self, name, _Aliased(metric, aliases[name]) if name in aliases else _Children(metric))
        # Agent-loop policing (tierflow.placement.agent_loops): policy is the limit crossed
        # (max_steps, max_session_tokens, max_prompt_tokens, runaway), action what it did.
        policing = ("tenant", "policy", "action")
        self.agent_loop_flagged = _Children(Counter(
            "tierflow_router_agent_loop_sessions_flagged", "Agent sessions over their tenant's agent-loop policy (each once, at its first step over)",
            policing, **kw))  # fmt: skip
        self.agent_loop_refused = _Children(Counter(
            "tierflow_router_agent_loop_refused", "Agent-session steps refused by the agent-loop policy (403 agent_loop_limit or summarization_required)",
            policing, **kw))  # fmt: skip
        self.agent_loop_sessions = Gauge("tierflow_router_agent_loop_sessions", "Agent sessions the router tracks (idle ones forgotten)", **kw)


class AdmissionCollector(Collector):
    """Admission's state per model, by request class and per tenant, read when Prometheus
    scrapes (nothing per request: the counters are admission's own)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily("tierflow_router_admission_limit", "Requests of the model this router lets in at once (0: no capacity known, no limit)", labels=["model"])
        slots = GaugeMetricFamily("tierflow_router_admission_slots", "This router's share of the model's batch slots on live nodes", labels=["model"])
        in_flight = GaugeMetricFamily("tierflow_router_admission_in_flight", "The model's requests admitted and not finished", labels=["model"])
        refused = CounterMetricFamily("tierflow_router_admission_refused", "Requests refused at the door (429) because the model was at its limit", labels=["model"])
        cuts = CounterMetricFamily("tierflow_router_admission_cuts", "Times node queue times over the budget cut the model's limit", labels=["model"])
        by_class = GaugeMetricFamily("tierflow_router_admission_class_in_flight", "The model's requests admitted and not finished, by request class", labels=["model", "class"])
        for stats in self._admission.snapshot():
            limit.add_metric([stats.model], stats.limit or 0)
            slots.add_metric([stats.model], stats.slots)
            in_flight.add_metric([stats.model], stats.in_flight)
            refused.add_metric([stats.model], stats.refused)
            cuts.add_metric([stats.model], stats.cuts)
            for name, count in stats.in_flight_by_class.items():
                by_class.add_metric([stats.model, name], count)
        # Per tenant and class (issue 21): who got in and who was refused for being over its share.
        labels = ["model", "tenant", "class"]
        tenant_admitted = CounterMetricFamily("tierflow_router_admission_tenant_admitted", "Requests admitted, by tenant and request class", labels=labels)
        tenant_refused = CounterMetricFamily("tierflow_router_admission_tenant_refused", "Requests refused at the door (429), by tenant and request class", labels=labels)
        tenant_in_flight = GaugeMetricFamily("tierflow_router_admission_tenant_in_flight", "Requests admitted and not finished, by tenant and request class", labels=labels)
        for flow in self._admission.flows():
            key = [flow.model, flow.tenant or "-", flow.request_class]
            tenant_admitted.add_metric(key, flow.admitted)
            tenant_refused.add_metric(key, flow.refused)
            tenant_in_flight.add_metric(key, flow.in_flight)
        yield from (limit, slots, in_flight, refused, cuts, by_class, tenant_admitted, tenant_refused, tenant_in_flight)


class PrefixIndexCollector(Collector):
    """The exact prefix index the nodes' KV events keep (issue 17), read when Prometheus
    scrapes: blocks known per node, and the feed's gaps, snapshot requests and rejects."""

    def __init__(self, feed: Any) -> None:
        self._feed = feed  # prefix_feed.PrefixFeed: index, asked, rejected

    def collect(self) -> Iterator[Metric]:
        feed = self._feed
        index = feed.index
        blocks = GaugeMetricFamily("tierflow_router_prefix_index_blocks", "KV blocks (all models, HBM and DDR) the router knows a node holds", labels=["node"])
        known = GaugeMetricFamily("tierflow_router_prefix_index_known", "1 when the router has the node's blocks exactly (a snapshot and every event since)", labels=["node"])
        trimmed = CounterMetricFamily("tierflow_router_prefix_index_trimmed", "Block hashes dropped by the per-node bound", labels=["node"])
        for node in index.nodes():
            blocks.add_metric([node], index.blocks(node))
            known.add_metric([node], 1.0 if index.knows(node) else 0.0)
            trimmed.add_metric([node], index.trimmed(node))
        yield from (blocks, known, trimmed)
        yield CounterMetricFamily("tierflow_router_prefix_index_gaps", "KV event messages that were not the next of their node (a snapshot is asked for)", value=index.gaps)
        yield CounterMetricFamily("tierflow_router_prefix_snapshot_requests", "KV snapshots this router asked nodes for", value=feed.asked)
        yield CounterMetricFamily("tierflow_router_prefix_events_rejected", "KV event messages refused (undecodable, or naming another node than their subject)", value=feed.rejected)


class HttpServerCollector(Collector):
    """The HTTP front door's own bounds (services/router/http_server.py), read at scrape time."""

    def __init__(self, server: Any) -> None:
        self._server = server  # http_server._Server: open_connections, refused_connections, late_request_heads

    def collect(self) -> Iterator[Metric]:
        server = self._server
        yield GaugeMetricFamily("tierflow_router_http_connections", "Open HTTP connections (counted against --max-connections)", value=server.open_connections)
        yield CounterMetricFamily("tierflow_router_http_refused_connections", "Connections refused with 503 over --max-connections", value=server.refused_connections)
        yield CounterMetricFamily("tierflow_router_http_late_request_heads", "Connections closed with 408: the request head took longer than --header-timeout", value=server.late_request_heads)
        yield CounterMetricFamily("tierflow_router_http_refused_per_client", "Connections refused with 503 over --max-connections-per-client (also in refused_connections)", value=server.refused_per_client)
        yield CounterMetricFamily("tierflow_router_http_late_request_bodies", "Connections closed with 408: the body came slower than --body-timeout plus --min-body-rate", value=server.late_request_bodies)
