"""How a simulation runs: fleet size, duration, placement policy, autoscaling, the network.

Everything a run needs besides the workload spec and the fleet, validated once. The
router's own configuration (tenants and `placement:`, the YAML `tierflow router --config`
reads) comes in as `router_config`, already parsed, so residency-bound and
rate-limited tenants behave as they would on the live router.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from tierflow.placement.admission import AdmissionConfig
from tierflow.scaling import ScalingConfig

__all__ = ["SimConfig", "SimError", "HOP_S"]

HOP_S = 0.003
"""One message hop (client -> router, router -> node, or back) with its handling, in
seconds: a request's first token reaches its client four hops (12 ms) after it was sent
plus what the chip takes. Fitted on the 2-core development machine to live runs of two
emulated nodes serving small models, where the client saw the emulated chip's TTFT plus
a median of 12 ms of the fabric's own software (HTTP, tokenizing, NATS, the node's
asyncio driver, the client). That overhead is not constant: it grows with the streams in
flight on a small machine (every streamed token is a message through the node, NATS, the
router and the client), which a fixed hop does not model. `loadtest/live_vs_sim.py`
measures the hop of the fabric it compares with and passes it as `hop_s`."""


class SimError(ValueError):
    """A simulation that cannot run as asked; `problems` lists each one (with its path)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("cannot simulate:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class SimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One run's settings.

    - `nodes`: rescale the fleet's deployments to this many initial nodes (None: as written).
    - `duration_s`: cap the spec's arrivals (None: the spec's own duration). Sessions that
      started before the cap run to their end.
    - `rate_scale`: multiply every arrival rate of the spec (the same sessions otherwise).
    - `policy`: a name from `tierflow.placement.POLICIES`; None takes the router
      configuration's `placement.policy` (default hotness).
    - `autoscale`: run the autoscaler (with `scaling`, the service's defaults) or keep
      the fleet as it starts.
    - `heartbeat_s`: every node's heartbeat interval (the nodes' default is 1 s).
    - `seed`: the workload's seed (None: the spec's) and the router's random choices.
    - `hop_s`: see `HOP_S`; `max_attempts`: the router's retries (its default, 3).
    - `sample_s`: how often the fleet is sampled for the timeline.
    - `token_events`: run the engines step by step with per-token events (exact ITL
      samples for the autoscaler, much slower); off by default.
    - `admission`: the router's admission (`tierflow.placement.admission`: per-model
      limits shared by request class and tenant weight), as the live router runs it by
      default; None (the default here) admits everything, as `--queue-budget 0`.
    """

    nodes: Annotated[int, Meta(ge=1)] | None = None
    duration_s: Annotated[float, Meta(gt=0)] | None = None
    rate_scale: Annotated[float, Meta(gt=0)] = 1.0
    policy: str | None = None
    router_config: dict[str, Any] = {}
    autoscale: bool = True
    scaling: ScalingConfig = ScalingConfig()
    heartbeat_s: Annotated[float, Meta(gt=0)] = 1.0
    seed: Annotated[int, Meta(ge=0)] | None = None
    hop_s: Annotated[float, Meta(ge=0)] = HOP_S
    max_attempts: Annotated[int, Meta(ge=1)] = 3
    sample_s: Annotated[float, Meta(gt=0)] = 10.0
    token_events: bool = False
    admission: AdmissionConfig | None = None

    def __post_init__(self) -> None:
        # The Meta limits bind when a config is decoded; a config built in code is checked here.
        problems = [
            f"{name} must be {rule}, got {value!r}"
            for name, value, ok, rule in (
                ("nodes", self.nodes, self.nodes is None or self.nodes >= 1, "at least 1"),
                ("duration_s", self.duration_s, self.duration_s is None or self.duration_s > 0, "> 0 seconds"),
                ("rate_scale", self.rate_scale, self.rate_scale > 0, "> 0"),
                ("heartbeat_s", self.heartbeat_s, self.heartbeat_s > 0, "> 0 seconds"),
                ("seed", self.seed, self.seed is None or self.seed >= 0, ">= 0"),
                ("hop_s", self.hop_s, self.hop_s >= 0, ">= 0 seconds"),
                ("max_attempts", self.max_attempts, self.max_attempts >= 1, "at least 1"),
                ("sample_s", self.sample_s, self.sample_s > 0, "> 0 seconds"),
            )
            if not ok
        ]
        if problems:
            raise SimError(problems)
