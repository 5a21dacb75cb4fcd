"""vLLM's metric conventions, in one place for the router and the nodes.

The fabric exposes vLLM's own metric names (`vllm:*`, label `model_name`) beside its
`tierflow_*` metrics, so a stock vLLM dashboard, alert or autoscaler (KEDA, the
Gateway API inference extension) reads the fabric as it reads a vLLM server. Each
`vllm:*` name is exposed by exactly one tier, so Prometheus' sums across targets never
count a request twice:

- the router (the fabric's API server, as vLLM's frontend is): what the client saw,
  one observation per request: `e2e_request_latency_seconds`,
  `time_to_first_token_seconds`, `inter_token_latency_seconds`, `request_success`,
  `prompt_tokens`, `generation_tokens`, `request_prompt_tokens`,
  `request_generation_tokens`, `request_max_num_generation_tokens`;
- each node (an engine, label `engine` = node id): scheduler state and where a request's
  time went on it: `num_requests_running`, `num_requests_waiting`,
  `kv_cache_usage_perc`, `prefix_cache_queries`/`hits`,
  `request_queue_time_seconds`, `request_prefill_time_seconds`,
  `request_decode_time_seconds`, `request_inference_time_seconds`.

Buckets are vLLM's current defaults (vllm/v1/metrics/buckets.py), so quantiles computed
by dashboards and recording rules written for vLLM mean the same here.
"""

from __future__ import annotations

__all__ = [
    "ENGINE_LABEL",
    "INTER_TOKEN_LATENCY_BUCKETS",
    "MODEL_LABEL",
    "REQUEST_LATENCY_BUCKETS",
    "REQUEST_TOKENS_BUCKETS",
    "TIME_TO_FIRST_TOKEN_BUCKETS",
    "build_1_2_5_buckets",
]

MODEL_LABEL = "model_name"
ENGINE_LABEL = "engine"

# e2e, queue, inference, prefill and decode time: sub-second up to multi-hour batch requests.
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value`: vLLM's token-count buckets."""
    out: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(out)
            out.append(float(mantissa * scale))
        scale *= 10


# vLLM caps token-count buckets at its one model's max_model_len; a fabric serves many
# models through one histogram, so the cap is the longest context any of them may have.
REQUEST_TOKENS_BUCKETS: tuple[float, ...] = build_1_2_5_buckets(2_000_000)
