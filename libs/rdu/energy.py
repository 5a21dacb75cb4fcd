"""Energy: what a request costs in joules, from published node power and the timing model.

A node draws its power whether one request or a full batch runs, so a request's share is
``node power × busy seconds / batch``: the prefill of the batch's prompts, then
``output`` decode steps at that batch (`tierflow.rdu.timing`). Tokens per kWh is output
tokens over that energy. Power is the node's published figure (`PowerFigure`): an average
while serving where the vendor gives one (SambaRack), else the maximum rating (DGX), so a
GPU node's energy is an upper bound. Idle power is not published for any of these nodes:
`node_idle_w` stays None rather than a guess, and only busy time is charged.

The engine (`tierflow.rdu.NodeEngine`) charges the same way as it runs, from its own
clock-time accounting: every piece of work (a weight load, a batched prefill, a decode
step) costs ``node power × its duration``; a prefill's or a step's share goes in equal parts
to the sequences in it (a request's ``energy_j``), and all of it to the model it ran for
(per-model counters: loads included). Time between pieces of work is charged at
`node_idle_w` to the node only, when a figure exists (`node_energy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

import msgspec

from .catalog import ModelSpec
from .hardware import HardwareProfile
from .timing import decode_step_time, prefill_time, resident_bytes

__all__ = [
    "PowerFigure",
    "POWER",
    "RequestEnergy",
    "request_energy",
    "JOULES_PER_KWH",
    "power_for",
    "node_energy",
    "tokens_per_kwh",
]

JOULES_PER_KWH: Final = 3.6e6


class PowerFigure(msgspec.Struct, frozen=True):
    node_active_w: float  # the whole node while serving (see `kind`)
    kind: Literal["average", "max"]
    source: str
    socket_active_w: float | None = None  # one accelerator, where published
    node_idle_w: float | None = None  # not published for any built-in node


POWER: Final[Mapping[str, PowerFigure]] = MappingProxyType(
    {
        "sn40l-16": PowerFigure(
            10_000.0,
            "average",
            "SambaNova SambaRack SN40L-16 product copy: 'an average of only 10 kW' while"
            " serving, air-cooled (as transcribed, e.g. aiwiki.ai/wiki/sambanova_sn40l);"
            " no per-socket or idle figure published",
        ),
        "sn40l-8": PowerFigure(
            5_000.0,
            "average",
            "sn40l-16's published 10 kW average scaled by sockets (8 of 16): no 8-socket"
            " power figure is published",
        ),
        "h100-8x": PowerFigure(
            10_200.0,
            "max",
            "NVIDIA DGX H100 datasheet: ~10.2 kW max; H100 SXM up to 700 W TDP. Measured"
            " H100 draw in Llama-3-8B decode is 414-449 W (LLM-Inference-Bench,"
            " Plots/Fig_16_a_b/power_results.csv)",
            socket_active_w=700.0,
        ),
        "a100-8x": PowerFigure(
            6_500.0,
            "max",
            "NVIDIA DGX A100 User Guide DU-09821-001: 6.5 kW max; A100 SXM 400 W",
            socket_active_w=400.0,
        ),
    }
)


def power_for(profile: HardwareProfile | str) -> PowerFigure | None:
    """The published power of a profile's node, by name; None when there is none (the
    `zero` profile, a custom profile): its work is then charged nothing."""
    return POWER.get(profile if isinstance(profile, str) else profile.name)


def node_energy(power: PowerFigure | None, busy_s: float, up_s: float) -> float:
    """Joules a node drew over `up_s` seconds of which `busy_s` were busy: active power
    while busy, idle power (when published) for the rest."""
    if power is None:
        return 0.0
    idle = power.node_idle_w or 0.0
    return power.node_active_w * busy_s + idle * max(0.0, up_s - busy_s)


def tokens_per_kwh(tokens: float, joules: float) -> float | None:
    """Output tokens per kilowatt-hour; None when nothing was charged (no power figure)."""
    return tokens * JOULES_PER_KWH / joules if joules > 0 else None


class RequestEnergy(msgspec.Struct, frozen=True):
    model: str
    profile: str
    batch: int
    seconds: float  # the batch's busy time: prefill + decode
    joules_per_request: float
    tokens_per_kwh: float  # output tokens
    power: PowerFigure


def request_energy(
    spec: ModelSpec,
    profile: HardwareProfile,
    power: PowerFigure,
    *,
    prompt: int = 1024,
    output: int = 1024,
    batch: int = 1,
) -> RequestEnergy | None:
    """Energy of one request in a batch of `batch` alike; None if the model cannot fit."""
    if resident_bytes(spec, profile) > profile.hbm_capacity:
        return None
    prefill = prefill_time(spec, profile, [(prompt, 0)] * batch)
    mid = batch * (prompt + output / 2)
    decode = max(output - 1, 0) * decode_step_time(
        spec, profile, batch=batch, context_tokens=mid
    )
    seconds = prefill + decode
    joules = power.node_active_w * seconds / batch
    return RequestEnergy(
        spec.name,
        profile.name,
        batch,
        seconds,
        joules,
        output / (joules / JOULES_PER_KWH) if joules > 0 else float("inf"),
        power,
    )
