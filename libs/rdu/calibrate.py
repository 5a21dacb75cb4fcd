"""Calibration: the emulator against published figures, the fit, and leave-one-out.

`tierflow.rdu.figures.FIGURES` lists every published figure with its source. Five constants
are fitted, shared by every model and by both SN40L socket counts (never per model):
`hbm_efficiency`, `layer_overhead_s`, `moe_dispatch_s`, `spec_acceptance` and
`compute_efficiency` (see `tierflow.rdu.timing`). `fit_parameters()` is a deterministic
Nelder-Mead on the squared log-errors of the figures marked `fit` (a range counts as
exact anywhere inside it). Switching takes no fitted constant: it follows from published
link rates alone, so its figures are predictions.

`calibration_rows()` gives, per figure, the published value, the emulated one, the error,
whether it was fitted, and its leave-one-out error: the constants refitted without that
figure, then the figure predicted. A prediction's leave-one-out error is its error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec

from .catalog import BUILTIN_MODELS, ModelSpec
from .figures import FIGURES, Figure
from .hardware import BUILTIN_PROFILES, HardwareProfile
from .timing import (
    CALIBRATION_CONTEXT,
    decode_step_time,
    prefill_time,
    spec_plan,
    switch_time,
)

__all__ = [
    "TOLERANCE",
    "FIT_TOLERANCE",
    "FITTED_FIELDS",
    "FITTED_PROFILES",
    "CalibrationRow",
    "emulate",
    "calibration_rows",
    "fit_objective",
    "fit_parameters",
]

TOLERANCE: Final = 0.15  # every gated figure, and every leave-one-out prediction
FIT_TOLERANCE: Final = 0.10  # a fitted figure against the full fit
FITTED_FIELDS: Final = (
    "hbm_efficiency",
    "layer_overhead_s",
    "moe_dispatch_s",
    "spec_acceptance",
    "compute_efficiency",
)
FITTED_PROFILES: Final = ("sn40l-8", "sn40l-16")


class CalibrationRow(msgspec.Struct, frozen=True):
    figure: str
    unit: str
    published_low: float
    published_high: float
    emulated: float
    error: float  # 0 inside a published range, else relative to the nearest bound
    in_fit: bool
    loo_error: float  # refit without this figure, then predict it (== error if not in_fit)
    gated: bool
    source: str
    detail: str = ""

    @property
    def published(self) -> str:
        if self.published_low == self.published_high:
            return f"{self.published_low:g}"
        return f"{self.published_low:g}-{self.published_high:g}"

    @property
    def within_tolerance(self) -> bool:
        if not self.gated:
            return True
        fit_ok = not self.in_fit or abs(self.error) <= FIT_TOLERANCE
        return fit_ok and abs(self.error) <= TOLERANCE and abs(self.loo_error) <= TOLERANCE

    def to_json(self) -> dict[str, object]:
        """The `--json` shape: figure, published, emulated, error, in_fit, loo_error (+ extras)."""
        return {
            "figure": self.figure,
            "published": self.published_low
            if self.published_low == self.published_high
            else [self.published_low, self.published_high],
            "emulated": self.emulated,
            "error": self.error,
            "in_fit": self.in_fit,
            "loo_error": self.loo_error,
            "unit": self.unit,
            "gated": self.gated,
            "source": self.source,
        }


def relative_error(value: float, low: float, high: float) -> float:
    if value < low:
        return (value - low) / low
    if value > high:
        return (value - high) / high
    return 0.0


def _e2e_seconds(spec: ModelSpec, profile: HardwareProfile, fig: Figure) -> float:
    """Prefill `batch` prompts together, then `output - 1` decode steps at a growing context
    (the step is linear in context while memory-bound: the midpoint context is exact)."""
    prefill = prefill_time(spec, profile, [(fig.prompt, 0)] * fig.batch)
    steps = max(fig.output - 1, 0)
    mid = fig.batch * (fig.prompt + fig.output / 2)
    return prefill + steps * decode_step_time(spec, profile, batch=fig.batch, context_tokens=mid)


def emulate(
    fig: Figure,
    profiles: Mapping[str, HardwareProfile] = BUILTIN_PROFILES,
    models: Mapping[str, ModelSpec] = BUILTIN_MODELS,
) -> float:
    """What the emulator gives for `fig`, in the figure's unit."""
    spec = models[fig.model]
    profile = profiles[fig.profile]
    if not fig.spec_decode:
        profile = msgspec.structs.replace(profile, spec_acceptance=None)
    if fig.kind == "decode_tps":
        ctx = fig.batch * (fig.prompt or CALIBRATION_CONTEXT)
        return 1.0 / decode_step_time(spec, profile, batch=fig.batch, context_tokens=ctx)
    if fig.kind == "e2e_s":
        return _e2e_seconds(spec, profile, fig)
    if fig.kind == "ttft_s":
        return prefill_time(spec, profile, [(fig.prompt, 0)] * fig.batch)
    if fig.kind == "switch_s":
        return switch_time(spec, profile)
    if fig.kind == "switch_ratio":
        return switch_time(spec, profiles[fig.baseline]) / switch_time(spec, profile)
    raise ValueError(f"unknown figure kind {fig.kind!r}")


def _detail(
    fig: Figure, profiles: Mapping[str, HardwareProfile], models: Mapping[str, ModelSpec]
) -> str:
    spec, profile = models[fig.model], profiles[fig.profile]
    if fig.kind == "decode_tps" and fig.spec_decode:
        k = spec_plan(spec, profile, context_tokens=CALIBRATION_CONTEXT).draft_tokens
        return f"spec decode, k={k}" if k else ""
    if fig.kind == "switch_ratio":
        fast, slow = switch_time(spec, profile), switch_time(spec, profiles[fig.baseline])
        return f"{fast * 1e3:.1f} ms vs {fig.baseline} {slow * 1e3:,.0f} ms"
    return ""


def _log_error(value: float, fig: Figure) -> float:
    if value < fig.low:
        return math.log(value / fig.low)
    if value > fig.high:
        return math.log(value / fig.high)
    return 0.0


def fit_objective(
    profiles: Mapping[str, HardwareProfile] = BUILTIN_PROFILES,
    models: Mapping[str, ModelSpec] = BUILTIN_MODELS,
    figures: Sequence[Figure] | None = None,
) -> float:
    """Sum of squared log-errors of the fitted figures (zero anywhere inside a range)."""
    figs = [f for f in FIGURES if f.fit] if figures is None else figures
    return sum(_log_error(emulate(f, profiles, models), f) ** 2 for f in figs)


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
    "moe_dispatch_s": _Search(1e-6, 0.0, 1e3, 5.0, 2.0),
    "spec_acceptance": _Search(1.0, 0.3, 0.99, 0.75, 0.05),
    "step_overhead_s": _Search(1e-6, 0.0, 1e4, 50.0, 20.0),
    "compute_efficiency": _Search(1.0, 0.02, 1.0, 0.15, 0.05),
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


def _with(
    profiles: Mapping[str, HardwareProfile], values: Mapping[str, float]
) -> dict[str, HardwareProfile]:
    out = dict(profiles)
    for name in FITTED_PROFILES:
        out[name] = msgspec.structs.replace(profiles[name], **values)
    return out


def fit_parameters(
    profiles: Mapping[str, HardwareProfile] = BUILTIN_PROFILES,
    models: Mapping[str, ModelSpec] = BUILTIN_MODELS,
    fields: Sequence[str] = FITTED_FIELDS,
    figures: Sequence[Figure] | None = None,
) -> dict[str, float]:
    """Refit `fields` (default: the five shared ones) on the SN40L profiles, one value each
    for every model and both socket counts, against `figures` (default: those marked fit).

    Starts from the profiles' current values; outside a parameter's bounds the objective is
    infinite.
    """
    unknown = [f for f in fields if f not in _SEARCH]
    if unknown:
        raise ValueError(f"cannot fit {unknown}; fittable: {', '.join(_SEARCH)}")
    figs = [f for f in FIGURES if f.fit] if figures is None else list(figures)
    search = [_SEARCH[f] for f in fields]
    base = profiles[FITTED_PROFILES[-1]]
    start = []
    for f, p in zip(fields, search, strict=True):
        v = getattr(base, f)
        start.append(p.start if v is None else v / p.scale)

    def objective(x: Sequence[float]) -> float:
        if any(not p.low <= v <= p.high for v, p in zip(x, search, strict=True)):
            return math.inf
        values = {f: v * p.scale for f, v, p in zip(fields, x, search, strict=True)}
        return fit_objective(_with(profiles, values), models, figs)

    best = _nelder_mead(objective, start, [p.step for p in search])
    # restart from the best point with a smaller simplex: Nelder-Mead can stall
    best = _nelder_mead(objective, best, [p.step / 3 for p in search])
    return {f: v * p.scale for f, v, p in zip(fields, best, search, strict=True)}


def calibration_rows(
    profiles: Mapping[str, HardwareProfile] = BUILTIN_PROFILES,
    models: Mapping[str, ModelSpec] = BUILTIN_MODELS,
    figures: Sequence[Figure] = FIGURES,
    *,
    loo: bool = True,
) -> list[CalibrationRow]:
    """Every figure next to the emulator's value, with its leave-one-out error.

    `profiles` are taken as fitted (the built-ins carry the fit); leave-one-out refits the
    shared constants on the other fitted figures and predicts the one left out.
    """
    fitted = [f for f in figures if f.fit]
    rows = []
    for fig in figures:
        value = emulate(fig, profiles, models)
        err = relative_error(value, fig.low, fig.high)
        loo_err = err
        if fig.fit and loo:
            others = [f for f in fitted if f is not fig]
            refit = _with(profiles, fit_parameters(profiles, models, figures=others))
            loo_err = relative_error(emulate(fig, refit, models), fig.low, fig.high)
        rows.append(
            CalibrationRow(
                fig.key, fig.unit, fig.low, fig.high, value, err, fig.fit, loo_err,
                fig.gated, fig.source, _detail(fig, profiles, models),
            )
        )
    return rows
