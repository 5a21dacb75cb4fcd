"""Calibration: the emulator against the published figures, and the fit behind it.

`calibration_rows()` compares the built-in profiles with every public figure in the design
(five single-user decode speeds on a 16-socket SN40L node, and model switching 15× faster
than a DGX H100). `fit_parameters()` reproduces the fit of the four shared SN40L
parameters (see `tierflow.rdu.timing` for what they mean): a deterministic Nelder-Mead on
the squared log-errors against the five decode figures, a range counting at its midpoint.
Four parameters, five figures: the fit is over-determined, and its residuals (up to 8%)
are what is left after the physics. The switching ratio takes no part in the fit; it is a
prediction from link rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec

from .catalog import BUILTIN_MODELS, ModelSpec
from .hardware import BUILTIN_PROFILES, HardwareProfile
from .timing import CALIBRATION_CONTEXT, decode_tokens_per_second, spec_plan, switch_time

__all__ = [
    "TOLERANCE",
    "FITTED_FIELDS",
    "DecodeFigure",
    "DECODE_FIGURES",
    "SWITCH_SPEEDUP",
    "CalibrationRow",
    "calibration_rows",
    "fit_objective",
    "fit_parameters",
]

TOLERANCE: Final = 0.15
FITTED_FIELDS: Final = ("hbm_efficiency", "layer_overhead_s", "moe_dispatch_s", "spec_acceptance")


class DecodeFigure(msgspec.Struct, frozen=True):
    """A published single-user decode speed (tokens/s), a point or a range."""

    model: str
    low: float
    high: float
    note: str = ""


DECODE_FIGURES: Final[tuple[DecodeFigure, ...]] = (
    DecodeFigure("llama-3.1-8b", 1042, 1042),
    DecodeFigure("llama-3.1-70b", 457, 457, "speculative decoding"),
    DecodeFigure("llama-3.1-405b", 129, 129, "speculative decoding"),
    DecodeFigure("deepseek-r1", 198, 250),
    DecodeFigure("gpt-oss-120b", 600, 740),
)
SWITCH_SPEEDUP: Final = 15.0  # SN40L node vs DGX H100, model switching
_SWITCH_MODELS: Final = ("llama-3.1-8b", "llama-3.1-70b")


class CalibrationRow(msgspec.Struct, frozen=True):
    figure: str
    unit: str
    published_low: float
    published_high: float
    emulated: float
    relative_error: float  # 0 inside a published range, else relative to the nearest bound
    within_tolerance: bool
    fitted: bool  # True if the figure took part in the fit; False: a prediction
    detail: str = ""

    @property
    def published(self) -> str:
        if self.published_low == self.published_high:
            return f"{self.published_low:g}"
        return f"{self.published_low:g}-{self.published_high:g}"


def _relative_error(value: float, low: float, high: float) -> float:
    if value < low:
        return (value - low) / low
    if value > high:
        return (value - high) / high
    return 0.0


def _row(
    figure: str, unit: str, low: float, high: float, value: float, *, fitted: bool, detail: str = ""
) -> CalibrationRow:
    err = _relative_error(value, low, high)
    return CalibrationRow(
        figure, unit, low, high, value, err, abs(err) <= TOLERANCE, fitted, detail
    )


def calibration_rows(
    profiles: Mapping[str, HardwareProfile] = BUILTIN_PROFILES,
    models: Mapping[str, ModelSpec] = BUILTIN_MODELS,
) -> list[CalibrationRow]:
    """Every published figure next to what the emulator produces for it."""
    sn40l, h100 = profiles["sn40l-16"], profiles["h100-8x"]
    rows = []
    for fig in DECODE_FIGURES:
        spec = models[fig.model]
        tps = decode_tokens_per_second(spec, sn40l)
        k = spec_plan(spec, sn40l, context_tokens=CALIBRATION_CONTEXT).draft_tokens
        detail = f"spec decode, k={k}" if k else ""
        rows.append(
            _row(
                f"decode 1 user {fig.model}",
                "tok/s",
                fig.low,
                fig.high,
                tps,
                fitted=True,
                detail=detail,
            )
        )
    for name in _SWITCH_MODELS:
        fast, slow = switch_time(models[name], sn40l), switch_time(models[name], h100)
        rows.append(
            _row(
                f"switch speed-up {name}",
                "x",
                SWITCH_SPEEDUP,
                SWITCH_SPEEDUP,
                slow / fast,
                fitted=False,
                detail=f"{fast * 1e3:.1f} ms vs h100-8x {slow * 1e3:,.0f} ms",
            )
        )
    return rows


def fit_objective(
    profile: HardwareProfile, models: Mapping[str, ModelSpec] = BUILTIN_MODELS
) -> float:
    """Sum of squared log-errors of the decode figures (ranges at their midpoint)."""
    total = 0.0
    for fig in DECODE_FIGURES:
        tps = decode_tokens_per_second(models[fig.model], profile)
        total += math.log(tps / ((fig.low + fig.high) / 2)) ** 2
    return total


class _Search(msgspec.Struct, frozen=True):
    """How to search one parameter: in natural units, inside physical bounds."""

    scale: float  # natural unit -> profile unit (microseconds for the overheads)
    low: float
    high: float
    start: float
    step: float


_SEARCH: Final[Mapping[str, _Search]] = {
    "hbm_efficiency": _Search(1.0, 0.3, 1.0, 0.8, 0.05),
    "layer_overhead_s": _Search(1e-6, 0.0, 1e3, 10.0, 3.0),
    "moe_dispatch_s": _Search(1e-6, 0.0, 1e3, 30.0, 10.0),
    "spec_acceptance": _Search(1.0, 0.3, 0.99, 0.75, 0.05),
    "step_overhead_s": _Search(1e-6, 0.0, 1e4, 50.0, 20.0),
}


def _nelder_mead(
    f: Callable[[Sequence[float]], float],
    x0: Sequence[float],
    step: Sequence[float],
    iterations: int = 600,
) -> list[float]:
    n = len(x0)
    simplex = [list(x0)] + [
        [x0[j] + (step[i] if j == i else 0.0) for j in range(n)] for i in range(n)
    ]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if values[-1] - values[0] < 1e-14:
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]

        def toward(
            t: float, worst: list[float] = worst, centroid: list[float] = centroid
        ) -> list[float]:
            return [c + t * (w - c) for c, w in zip(centroid, worst, strict=True)]

        reflected = toward(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = toward(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = toward(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [
                    [b + 0.5 * (x - b) for b, x in zip(best, xs, strict=True)] for xs in simplex[1:]
                ]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[min(range(n + 1), key=values.__getitem__)]


def fit_parameters(
    base: HardwareProfile | None = None,
    models: Mapping[str, ModelSpec] = BUILTIN_MODELS,
    fields: Sequence[str] = FITTED_FIELDS,
) -> dict[str, float]:
    """Refit `fields` (default: the four shared ones) on `base` (default: sn40l-16).

    Outside a parameter's physical bounds the objective is infinite.
    """
    base = base or BUILTIN_PROFILES["sn40l-16"]
    unknown = [f for f in fields if f not in _SEARCH]
    if unknown:
        raise ValueError(f"cannot fit {unknown}; fittable: {', '.join(_SEARCH)}")
    search = [_SEARCH[f] for f in fields]

    def objective(x: Sequence[float]) -> float:
        if any(not p.low <= v <= p.high for v, p in zip(x, search, strict=True)):
            return math.inf
        values = {f: v * p.scale for f, v, p in zip(fields, x, search, strict=True)}
        return fit_objective(msgspec.structs.replace(base, **values), models)

    best = _nelder_mead(objective, [p.start for p in search], [p.step for p in search])
    # restart from the best point with a smaller simplex: Nelder-Mead can stall
    best = _nelder_mead(objective, best, [p.step / 3 for p in search])
    return {f: v * p.scale for f, v, p in zip(fields, best, search, strict=True)}
