"""The autoscaling policy's knobs, validated once (one model, cross-field rules in one place).

Limits sit on the fields (`Meta`), so `msgspec.convert(values, ScalingConfig)` names the
offending field; rules that relate two fields live in `__post_init__`, which msgspec
turns into the same kind of error when it converts.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["ScalingConfig", "PoolBounds"]

Seconds = Annotated[float, Meta(ge=0.0)]
PositiveSeconds = Annotated[float, Meta(gt=0.0)]


class ScalingConfig(Struct, frozen=True, kw_only=True):
    """Targets, SLOs and timing of the SLO-driven policy (see `tierflow.scaling.machine`).

    Signals (each asks for a replica count; the largest ask wins):
      target_utilization          (running + waiting) / batch slots per replica
      target_queue_per_replica    waiting requests per ready replica
      target_prompt_tokens_per_replica  queued prompt tokens per prefill replica
      ttft_slo / itl_slo          p95 time-to-first-token / inter-token latency, seconds;
                                  0 turns that signal off
      latency_headroom            below `headroom * SLO` a latency signal lets capacity go;
                                  between that and the SLO it holds the current count

    Timing:
      panic_window    scale up to what the load asked for *throughout* this window (short)
      stable_window   scale down only to what it asked for throughout this window (long),
                      and only after observing fresh signals for a whole stable window
      cooldown_up     seconds between two scale-ups
      cooldown_down   seconds after any change before a scale-down
      max_step_up / max_step_down   replicas added / removed per decision
      max_signal_age  a snapshot older than this is stale: no scale-down on it
    """

    target_utilization: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.7
    target_queue_per_replica: Annotated[float, Meta(gt=0.0)] = 4.0
    target_prompt_tokens_per_replica: Annotated[int, Meta(gt=0)] = 16384
    ttft_slo: Seconds = 2.0
    itl_slo: Seconds = 0.1
    latency_headroom: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.8
    panic_window: Seconds = 10.0
    stable_window: PositiveSeconds = 300.0
    cooldown_up: Seconds = 10.0
    cooldown_down: Seconds = 60.0
    max_step_up: Annotated[int, Meta(ge=1)] = 4
    max_step_down: Annotated[int, Meta(ge=1)] = 1
    max_signal_age: PositiveSeconds = 15.0

    def __post_init__(self) -> None:
        if self.panic_window > self.stable_window:
            raise ValueError(
                f"panic_window ({self.panic_window:g}s) must not exceed stable_window ({self.stable_window:g}s): "
                "scaling up has to react faster than scaling down"
            )


class PoolBounds(Struct, frozen=True, kw_only=True):
    """min/max replicas of one pool of a deployment."""

    min_replicas: Annotated[int, Meta(ge=0)] = 1
    max_replicas: Annotated[int, Meta(ge=0)] = 1

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))
