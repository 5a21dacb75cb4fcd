"""The workload spec: tenants, agent flows, a model mix, arrivals and SLOs, from one YAML file.

    name: agentic-small
    duration_s: 600
    seed: 7
    slo: {ttft_ms: 2000, itl_ms: 150, e2e_ms: 60000}
    tenants:
      - {name: acme, api_key: sk-acme, weight: 3, workload: interactive}
      - {name: batchco, api_key: sk-batch, weight: 1, workload: batch}
    flows:                                  # agent flows: a session runs the steps in order
      - name: coding-agent
        weight: 1
        task_tokens: 300                    # the session's task, after the role's system prompt
        steps:
          - {model: planner, role: planner, system_tokens: 400, max_tokens: 64}
          - {tool: search, latency_s: 0.5, output_tokens: 200}   # a tool call: waits, adds its output to history
          - {model: reasoner, role: reasoner, system_tokens: 400, max_tokens: 256}
          - {model: summarizer, role: summarizer, system_tokens: 200, max_tokens: 64}
        think_s: 0.2                        # client-side pause between steps
    mix:                                    # single calls outside any flow (optional)
      weight: 0.5                           # relative to the flows' weights
      prompt_tokens: {mean: 800, sd: 200}
      max_tokens: {mean: 128, sd: 32}
      models: [{model: planner, weight: 2}, {model: summarizer, weight: 1}]
    arrivals:                               # sessions (and single calls) per second
      - {kind: poisson, rate: 2.0, duration_s: 300}
      - {kind: bursts, rate: 1.0, burst_rate: 5.0, every_s: 60, burst_s: 10, duration_s: 300}
      - {kind: diurnal, rate: 2.0, amplitude: 0.5, period_s: 600, duration_s: 600}
      - {kind: steady, rate: 1.0, duration_s: 60}

Phases run one after another; `duration_s` at the top caps the whole run. Every size is
in tokens of `tierflow.tokenizer`, so the simulator and the live fabric count alike.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "SpecError",
    "Slo",
    "TenantSpec",
    "Distribution",
    "CallStep",
    "ToolStep",
    "FlowSpec",
    "MixModel",
    "MixSpec",
    "Arrival",
    "WorkloadSpec",
]

Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Name = Annotated[str, Meta(min_length=1, max_length=128)]


class SpecError(ValueError):
    """A spec that cannot run; `problems` lists each one with its path (`$.flows[0].steps[2].model`)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid workload spec:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class Slo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request targets; a request meets the SLO when it meets every one that is set."""

    ttft_ms: Positive | None = None
    itl_ms: Positive | None = None
    e2e_ms: Positive | None = None


class TenantSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    api_key: str = "tierflow"  # what the live driver sends as the bearer token
    weight: Positive = 1.0
    workload: Literal["interactive", "batch"] | None = None


class Distribution(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token count drawn per use: normal around `mean`, clipped to [min, max]; sd 0 is fixed."""

    mean: Positive
    sd: NonNegative = 0.0
    min: Annotated[int, Meta(ge=1)] = 1
    max: Annotated[int, Meta(ge=1)] | None = None


class CallStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A model call: the role's system prompt, the session's task, then the history so far."""

    model: Name
    role: Name | None = None  # names the system prompt; defaults to the model name
    system_tokens: Annotated[int, Meta(ge=0)] = 200
    max_tokens: Annotated[int, Meta(ge=1)] | Distribution = 128


class ToolStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A tool call between model calls: takes `latency_s`, appends `output_tokens` to the history."""

    tool: Name
    latency_s: NonNegative = 0.0
    output_tokens: Annotated[int, Meta(ge=0)] = 0


class FlowSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: Name
    steps: Annotated[list[CallStep | ToolStep], Meta(min_length=1)]  # decoded by field: `model` vs `tool`
    weight: Positive = 1.0
    task_tokens: Annotated[int, Meta(ge=0)] | Distribution = 200
    think_s: NonNegative = 0.0
    tenants: list[str] | None = None  # None: every tenant runs this flow


class MixModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Name
    weight: Positive = 1.0


class MixSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models: Annotated[list[MixModel], Meta(min_length=1)]
    weight: Positive = 1.0
    prompt_tokens: Distribution = Distribution(mean=512)
    max_tokens: Distribution = Distribution(mean=128)


class Arrival(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One phase of arrivals (sessions or single calls per second).

    - steady: exactly every 1/rate seconds; poisson: exponential gaps at `rate`;
    - bursts: `rate`, and `burst_rate` for `burst_s` out of every `every_s` seconds;
    - diurnal: rate(t) = rate * (1 + amplitude * sin(2 pi t / period_s)), Poisson-thinned.
    """

    kind: Literal["steady", "poisson", "bursts", "diurnal"]
    rate: Positive
    duration_s: Positive
    burst_rate: Positive | None = None
    every_s: Positive | None = None
    burst_s: Positive | None = None
    amplitude: Annotated[float, Meta(ge=0, le=1)] = 0.0
    period_s: Positive | None = None


class WorkloadSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: Name
    arrivals: Annotated[list[Arrival], Meta(min_length=1)]
    tenants: list[TenantSpec] = [TenantSpec(name="default")]
    flows: list[FlowSpec] = []
    mix: MixSpec | None = None
    slo: Slo = Slo()
    seed: int = 0
    duration_s: Positive | None = None  # caps the phases' total
