"""Node metrics: `tierflow_*`, and vLLM's engine-side `vllm:*` beside them.

The `vllm:*` ones are labelled (model_name, engine), the engine being this node, and
per model: running and waiting requests, the KV pool's usage, prefix-cache counters and
where each request's time went (queue, prefill, decode); tierflow.runtime.vllm_metrics
says why both sets and which tier exposes what. The KV pool is shared by the models on a
node, so each model's `vllm:kv_cache_usage_perc` is the pool it draws from, as a vLLM
server's is for its one model.

`ModelMetrics` holds one model's children on this node: `labels()` looks a child up
through a lock and a tuple of strings every call, eight times a finished request; the
children are resolved once per model (and finish reason, tier) instead (issue 16).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tierflow.rdu import EngineSnapshot
from tierflow.rdu.fairness import CLASS_NAMES
from tierflow.runtime import vllm_metrics as vllm

__all__ = ["ModelMetrics", "NodeMetrics"]

# fine at the fast end, and vLLM's top buckets so a long wait does not land in +Inf
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


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
        # Energy (tierflow.rdu.energy): joules drawn for each model's work (loads, prefills,
        # decode steps) at the node's published power, and the node's power now.
        self.energy = Counter("tierflow_node_energy_joules", "Energy drawn for each model's work on the node, joules", labels, registry=registry)
        self.power = Gauge("tierflow_node_power_watts", "Power the node draws now, watts (0: no published figure)", ("node",), registry=registry)
        self._energy_seen: dict[tuple[str, str], float] = {}
        # Fair queuing (tierflow.rdu.fairness): the queue and its waits per request class,
        # and sequences preempted for interactive work.
        self.queue_depth = Gauge("tierflow_node_queue_depth", "Requests waiting on the node per request class (preempted ones included)", ("node", "request_class"), registry=registry)
        self.class_queue_time = Histogram("tierflow_node_class_queue_time_seconds", "Time queued on the node before entering a batch, per request class", ("node", "request_class"), buckets=_LATENCY_BUCKETS, registry=registry)
        self.preemptions = Counter("tierflow_node_preemptions", "Sequences taken out of a full batch (KV parked in DDR) for interactive work", labels, registry=registry)
        self._class_children: dict[tuple[str, str], tuple[Gauge, Histogram]] = {}
        self._preemptions_seen: dict[tuple[str, str], int] = {}
        self.vllm = VllmEngineMetrics(registry)

    def set_energy(self, node: str, snap: EngineSnapshot) -> None:
        """The engine's energy figures: each model's counter moves by what it drew since the last call."""
        self.power.labels(node).set(snap.power_w)
        seen = self._energy_seen
        for m in snap.models:
            key = (node, m.name)
            grown = m.energy_joules - seen.get(key, 0.0)
            if grown > 0:
                self.energy.labels(node, m.name).inc(grown)
                seen[key] = m.energy_joules
            elif key not in seen:
                self.energy.labels(node, m.name)  # present at 0 from the start
                seen[key] = m.energy_joules

    def _class(self, node: str, request_class: str) -> tuple[Gauge, Histogram]:
        children = self._class_children.get((node, request_class))
        if children is None:
            children = self._class_children[(node, request_class)] = (
                self.queue_depth.labels(node, request_class), self.class_queue_time.labels(node, request_class))
        return children

    def queued_for(self, node: str, request_class: str, seconds: float) -> None:
        """A request of `request_class` entered a batch after `seconds` in the node's queue."""
        self._class(node, request_class)[1].observe(seconds)

    def set_queues(self, node: str, snap: EngineSnapshot) -> None:
        """The engine's queue per class, and its preemptions: each model's counter moves by
        those since the last call."""
        for name, depth in zip(CLASS_NAMES, snap.queued_by_class):
            self._class(node, name)[0].set(depth)
        seen = self._preemptions_seen
        for m in snap.models:
            key = (node, m.name)
            if key not in seen:
                self.preemptions.labels(node, m.name)  # present at 0 from the start
                seen[key] = 0
            grown = m.preemptions - seen[key]
            if grown > 0:
                self.preemptions.labels(node, m.name).inc(grown)
                seen[key] = m.preemptions

    def set_model_state(self, node: str, model: str, running: int, waiting: int, kv_usage: float) -> None:
        """A model's scheduler state on this node, as vLLM reports it (per model_name)."""
        v = self.vllm
        v.running.labels(model, node).set(running)
        v.waiting.labels(model, node).set(waiting)
        v.kv_usage.labels(model, node).set(kv_usage)


class VllmEngineMetrics:
    """vLLM's engine-side metrics, labelled (model_name, engine)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = (vllm.MODEL_LABEL, vllm.ENGINE_LABEL)
        kw: dict = {"registry": registry}
        latency: dict = {"buckets": vllm.REQUEST_LATENCY_BUCKETS, **kw}
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels, **kw)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, **kw)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, **kw)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels, **kw)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels, **kw)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", labels, **latency)
        self.inference_time = Histogram("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", labels, **latency)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", labels, **latency)
        self.decode_time = Histogram("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", labels, **latency)


class ModelMetrics:
    """One model's per-request metric children on one node, resolved once."""

    __slots__ = (
        "_labels", "_loads", "_metrics", "_requests", "_vllm", "generation_tokens", "prefix_cache_hits", "prefix_cache_queries",
        "prompt_tokens", "queue_time", "ttft",
    )  # fmt: skip

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
        v = metrics.vllm
        self._vllm = tuple(m.labels(model, node) for m in (
            v.queue_time, v.prefill_time, v.decode_time, v.inference_time, v.prefix_cache_queries, v.prefix_cache_hits))  # fmt: skip

    def served(self, queue_time: float, prefill_time: float, decode_time: float, prompt_tokens: int, cached_tokens: int) -> None:
        """vLLM's view of one request finished here: where its time on this node went
        (queued, prefill to the first token, decode after it) and its prefix-cache use."""
        queue, prefill, decode, inference, queries, hits = self._vllm
        queue.observe(queue_time)
        prefill.observe(prefill_time)
        decode.observe(decode_time)
        inference.observe(prefill_time + decode_time)
        queries.inc(prompt_tokens)
        hits.inc(cached_tokens)

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
