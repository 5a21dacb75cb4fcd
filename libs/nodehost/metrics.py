"""Node metrics, with vLLM's names under the `tierflow_` prefix where one exists.

`ModelMetrics` holds one model's children on this node: `labels()` looks a child up
through a lock and a tuple of strings every call, eight times a finished request; the
children are resolved once per model (and finish reason, tier) instead (issue 16).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ModelMetrics", "NodeMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("node", "model")
        self.requests_running = Gauge("tierflow_num_requests_running", "Requests in a running batch", ("node",), registry=registry)
        self.requests_waiting = Gauge("tierflow_num_requests_waiting", "Requests queued on the node", ("node",), registry=registry)
        self.kv_cache_usage = Gauge("tierflow_kv_cache_usage_perc", "KV-cache usage, 0..1", ("node",), registry=registry)
        self.prefix_cache_hits = Counter("tierflow_prefix_cache_hits", "Prompt tokens served from the prefix cache", labels, registry=registry)
        self.prefix_cache_queries = Counter("tierflow_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=registry)
        self.model_tier = Gauge("tierflow_model_tier", "1 for the tier each model is in on this node", ("node", "model", "tier"), registry=registry)
        self.bundle_outdated = Gauge("tierflow_node_bundle_outdated", "1 while the registry holds another bundle for this node's deployment than it serves (restart it)", ("node",), registry=registry)
        self.queue_time = Histogram("tierflow_request_queue_time_seconds", "Time queued on the node before entering a batch", labels, buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("tierflow_node_time_to_first_token_seconds", "Node-side time to first token", labels, buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("tierflow_prompt_tokens", "Prompt tokens processed", labels, registry=registry)
        self.generation_tokens = Counter("tierflow_generation_tokens", "Tokens generated", labels, registry=registry)
        self.requests = Counter("tierflow_node_requests", "Requests finished on the node", (*labels, "finish_reason"), registry=registry)
        self.dropped = Counter("tierflow_node_requests_dropped", "Streams the node ended itself: deadline passed, router gone, or a message could not be published", (*labels, "reason"), registry=registry)
        self.loads = Counter("tierflow_model_loads", "Requests that found their model in each tier", (*labels, "tier"), registry=registry)


class ModelMetrics:
    """One model's per-request metric children on one node, resolved once."""

    __slots__ = ("_labels", "_loads", "_metrics", "_requests", "generation_tokens", "prefix_cache_hits", "prefix_cache_queries", "prompt_tokens", "queue_time", "ttft")

    def __init__(self, metrics: NodeMetrics, node: str, model: str) -> None:
        self._labels = (node, model)
        self._metrics = metrics
        self._requests: dict[str, Counter] = {}
        self._loads: dict[str, Counter] = {}
        self.queue_time = metrics.queue_time.labels(node, model)
        self.ttft = metrics.ttft.labels(node, model)
        self.prompt_tokens = metrics.prompt_tokens.labels(node, model)
        self.generation_tokens = metrics.generation_tokens.labels(node, model)
        self.prefix_cache_queries = metrics.prefix_cache_queries.labels(node, model)
        self.prefix_cache_hits = metrics.prefix_cache_hits.labels(node, model)

    def requests(self, finish_reason: str) -> Counter:
        child = self._requests.get(finish_reason)
        if child is None:
            child = self._requests[finish_reason] = self._metrics.requests.labels(*self._labels, finish_reason)
        return child

    def loads(self, tier: str) -> Counter:
        child = self._loads.get(tier)
        if child is None:
            child = self._loads[tier] = self._metrics.loads.labels(*self._labels, tier)
        return child
