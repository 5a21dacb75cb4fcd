"""The router's and the node's vLLM-compatible metrics (tierflow.runtime.vllm_metrics).

vLLM's names and buckets on a fresh registry: a 300 s request lands in a finite bucket
(vLLM's buckets go to 7680 s; the old ones stopped at 240 s), one record call feeds the
`tierflow_*` metric and its `vllm:*` alias alike, and per-model node gauges carry
`model_name`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tierflow.nodehost.metrics import ModelMetrics, NodeMetrics
from tierflow.runtime import vllm_metrics as vllm
from tierflow.services.router.metrics import RouterMetrics


def test_buckets_are_vllms_current_families() -> None:
    assert vllm.REQUEST_LATENCY_BUCKETS[-6:] == (120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
    assert vllm.TIME_TO_FIRST_TOKEN_BUCKETS[-3:] == (160.0, 640.0, 2560.0)
    assert vllm.build_1_2_5_buckets(100) == (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    assert vllm.REQUEST_TOKENS_BUCKETS[-1] >= 1_000_000


def test_router_records_each_request_under_both_names() -> None:
    registry = CollectorRegistry()
    m = RouterMetrics(registry)
    labels = ("llama", "v1", "acme")
    m.e2e.labels(*labels).observe(300.0)
    m.ttft.labels(*labels).observe(0.2)
    m.itl.labels(*labels).observe(0.004)
    m.prompt_tokens.labels(*labels).inc(7)
    m.completion_tokens.labels(*labels).inc(5)
    m.vllm.served("llama", "length", 7, 5)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    ours, theirs = {"model": "llama", "version": "v1", "tenant": "acme"}, {"model_name": "llama"}
    for name in ("tierflow_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"):
        labels_ = ours if name.startswith("tierflow") else theirs
        assert value(f"{name}_bucket", **labels_, le="240.0") == 0.0
        assert value(f"{name}_bucket", **labels_, le="480.0") == 1.0  # not only in +Inf
    assert value("vllm:time_to_first_token_seconds_count", **theirs) == 1.0
    assert value("tierflow_inter_token_latency_seconds_bucket", **ours, le="0.005") == 1.0  # fine buckets stay ours
    assert value("vllm:inter_token_latency_seconds_bucket", **theirs, le="0.01") == 1.0
    assert value("vllm:prompt_tokens_total", **theirs) == 7.0
    assert value("vllm:generation_tokens_total", **theirs) == 5.0
    assert value("tierflow_router_generation_tokens_total", **ours) == 5.0
    assert value("vllm:request_success_total", model_name="llama", finished_reason="length") == 1.0
    assert value("vllm:request_prompt_tokens_bucket", **theirs, le="10.0") == 1.0
    assert value("vllm:request_generation_tokens_bucket", **theirs, le="5.0") == 1.0
    assert value("vllm:request_max_num_generation_tokens_count", **theirs) == 1.0


def test_node_reports_per_model_state_and_request_phases() -> None:
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    metrics.set_model_state("n0", "llama", running=3, waiting=2, kv_usage=0.25)
    metrics.set_model_state("n0", "qwen", running=1, waiting=0, kv_usage=0.25)
    ModelMetrics(metrics, "n0", "llama").served(queue_time=600.0, prefill_time=0.5, decode_time=2.0, prompt_tokens=64, cached_tokens=32)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    llama = {"model_name": "llama", "engine": "n0"}
    assert value("vllm:num_requests_running", **llama) == 3.0
    assert value("vllm:num_requests_waiting", **llama) == 2.0
    assert value("vllm:num_requests_running", model_name="qwen", engine="n0") == 1.0
    assert value("vllm:kv_cache_usage_perc", **llama) == 0.25
    assert value("vllm:request_queue_time_seconds_bucket", **llama, le="480.0") == 0.0
    assert value("vllm:request_queue_time_seconds_bucket", **llama, le="960.0") == 1.0
    assert value("vllm:request_prefill_time_seconds_sum", **llama) == 0.5
    assert value("vllm:request_decode_time_seconds_sum", **llama) == 2.0
    assert value("vllm:request_inference_time_seconds_sum", **llama) == 2.5
    assert value("vllm:prefix_cache_queries_total", **llama) == 64.0
    assert value("vllm:prefix_cache_hits_total", **llama) == 32.0
