"""A trace, replayed: one session plan per request, so the live driver and the simulator run it unchanged.

    plan_replay(trace, spec, options) -> Replay(plans, duration_s, summary)

Each row the replay sends becomes a `SessionPlan` (flow "trace") holding one call: its
prompt is `trace_text.TracePrompt` (exactly the row's input tokens, chat template
included, sharing text with the rows that share its `hash_ids` prefix) and its
`max_tokens` is the row's output tokens; the drivers send `ignore_eos`, so exactly that
many come back. Rows of one trace session stay separate plans (their prompts are the
trace's, not a conversation's growing history) and send the session as `user`, so the
router keeps them together. Rules for rows that cannot be sent as written, each
counted in the summary:

- a row with 0 output tokens is not sent (no request can ask for none; in BurstGPT such
  rows are the requests that failed);
- a row shorter than the chat template (`TEMPLATE_TOKENS`, 13) is sent with 13 tokens.

Time: `window` picks trace seconds [start, start + duration) counted from the trace's
first row; a request's start is (its time - start) / speed.

Rate scale: row i of the window (0-based, in arrival order) is sent
floor((i + 1) x) - floor(i x) times. That is thinning for x < 1 (every 1/x-th row, evenly
through the trace) and replication for x > 1, with exactly floor(n x) requests for n rows
and each copy keeping its row's tokens. Copy c of a row (c >= 1) is a separate user
population: its text lies in its own prefix space (it shares prefixes with copy c of
other rows, as the trace's rows share with each other) and it starts c/m of the way to
the next row (m copies), so copies fill the gaps instead of piling onto one instant.

Which model and tenant: the model column through `trace.models` where the trace has one
(a name without an entry goes as written), else a weighted pick from `trace.mix`; the
tenant is the row's own where the trace names a tenant of the spec, else a weighted
pick from the spec's tenants. Picks are per sticky key (`trace.sticky`: the row's first
`trace.sticky_blocks` prefix blocks, its session, or the row itself) and copy, from a hash of the key and the
seed, so rows that share a prefix share a model (and its prefix cache) and a re-run
draws the same.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import msgspec
import numpy as np

from tierflow.workload.sessions import CallPlan, SessionPlan
from tierflow.workload.spec import TraceSpec, WorkloadSpec
from tierflow.workload.trace_stats import TraceSummary, trace_stats
from tierflow.workload.trace_text import TEMPLATE_TOKENS, TracePrompt
from tierflow.workload.traces import Trace

__all__ = ["ReplayError", "ReplayOptions", "Replay", "replay_options", "parse_window", "plan_replay"]


class ReplayError(ValueError):
    """A replay that cannot be planned as asked (bad window, rows without a model ...)."""


class ReplayOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How a trace is cut and stretched: trace seconds [window_start_s, + window_s), then
    replayed `speed` times faster, with `rate_scale` times the rows; `seed` draws picks
    and text."""

    window_start_s: float = 0.0
    window_s: float | None = None
    speed: float = 1.0
    rate_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule}, got {value!r}"
            for name, value, ok, rule in (
                ("window start", self.window_start_s, self.window_start_s >= 0, ">= 0 seconds"),
                ("window duration", self.window_s, self.window_s is None or self.window_s > 0, "> 0 seconds"),
                ("speed", self.speed, self.speed > 0, "> 0"),
                ("rate_scale", self.rate_scale, self.rate_scale > 0, "> 0"),
                ("seed", self.seed, self.seed >= 0, ">= 0"),
            )
            if not ok
        ]
        if problems:
            raise ReplayError("; ".join(problems))


class Replay(msgspec.Struct, frozen=True, kw_only=True):
    """The plans of a replay (sorted by start), the run's length in seconds (the window
    over `speed`) and the trace table's source and sent columns."""

    plans: list[SessionPlan]
    duration_s: float
    summary: TraceSummary


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str, what: str) -> float:
    text = text.strip()
    unit = text[-1:] if text[-1:] in ("s", "m", "h") else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise ReplayError(f"--window: the {what} {text!r} is not a number of seconds (e.g. 600, 10m, 1.5h)") from None
    if not math.isfinite(value):
        raise ReplayError(f"--window: the {what} {text!r} is not a number of seconds")
    return value


def parse_window(text: str) -> tuple[float, float | None]:
    """`START:DURATION` in trace seconds (suffix s, m or h allowed): "600:600", "10m:10m";
    "1h:" or "1h" replays from one hour in to the end."""
    start, _, duration = text.partition(":")
    return _seconds(start, "start") if start.strip() else 0.0, _seconds(duration, "duration") if duration.strip() else None


def replay_options(
    trace: TraceSpec | None,
    *,
    seed: int,
    window: tuple[float, float | None] | None = None,
    speed: float | None = None,
    rate_scale: float | None = None,
) -> ReplayOptions:
    """The spec's time controls with the command line's laid over them."""
    section = trace or TraceSpec()
    start, duration = window if window is not None else (section.window.start_s, section.window.duration_s)
    return ReplayOptions(
        window_start_s=start, window_s=duration, speed=speed if speed is not None else section.speed,
        rate_scale=rate_scale if rate_scale is not None else section.rate_scale, seed=seed,
    )  # fmt: skip


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) from `parts`, the same in every process and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class _Picker:
    """Weighted picks per sticky key, drawn once per key."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], stream: str, seed: int) -> None:
        self._names = list(names)
        self._cumulative = np.cumsum(weights, dtype=np.float64)
        self._stream, self._seed = stream, seed
        self._memo: dict[tuple[str, str, int], str] = {}

    def __call__(self, key: tuple[str, str, int]) -> str:
        name = self._memo.get(key)
        if name is None:
            u = _unit(self._stream, self._seed, key) * float(self._cumulative[-1])
            name = self._names[min(int(np.searchsorted(self._cumulative, u, side="right")), len(self._names) - 1)]
            self._memo[key] = name
        return name


def _space(seed: int, copy: int) -> int:
    """The prefix space of one replica under one seed (a 63-bit int, see TracePrompt.space)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{copy}".encode(), digest_size=8).digest(), "little") >> 1


def _window(trace: Trace, options: ReplayOptions) -> tuple[np.ndarray, float]:
    """Indices of the window's rows and the window's end in trace seconds."""
    start = options.window_start_s
    if start > trace.span_s:
        raise ReplayError(f"the window starts at {start:g} s, after the trace's last row ({trace.span_s:g} s after its first)")
    end = start + options.window_s if options.window_s is not None else math.inf
    picked = np.flatnonzero((trace.time_s >= start) & (trace.time_s < end) if math.isfinite(end) else trace.time_s >= start)
    if picked.size == 0:
        raise ReplayError(f"no row of the trace arrives in the window [{start:g} s, {end:g} s)")
    return picked, end


def _copies(rows: int, rate_scale: float) -> np.ndarray:
    """How many times each of `rows` rows is sent (see the module docstring)."""
    edges = np.floor(np.arange(rows + 1, dtype=np.float64) * rate_scale + 1e-9).astype(np.int64)
    return np.diff(edges)


def _sticky(trace: Trace, section: TraceSpec) -> str:
    return section.sticky or ("session" if trace.session is not None else "prefix")


def plan_replay(trace: Trace, spec: WorkloadSpec, options: ReplayOptions) -> Replay:
    """Every request of the replay as a session plan, and the trace table's figures."""
    section = spec.trace or TraceSpec()
    picked, end = _window(trace, options)
    zero_output = int((trace.output_tokens[picked] == 0).sum())
    sendable = picked[trace.output_tokens[picked] > 0]
    if sendable.size == 0:
        raise ReplayError(f"every row of the window asks for 0 output tokens ({picked.size} rows): nothing to send")
    models = _models(trace, section, sendable, options.seed)
    tenants = {t.name: t for t in spec.tenants}
    tenant_pick = _Picker([t.name for t in spec.tenants], [t.weight for t in spec.tenants], "tenant", options.seed)
    sticky = _sticky(trace, section)
    copies = _copies(sendable.size, options.rate_scale)
    times = (trace.time_s[sendable] - options.window_start_s) / options.speed
    following = np.append(times[1:], (min(end, trace.span_s) - options.window_start_s) / options.speed)
    plans: list[SessionPlan] = []
    for position, row in enumerate(sendable.tolist()):
        count = int(copies[position])
        if count == 0:
            continue
        line = int(trace.line[row])
        ids = trace.hash_ids[row]
        key_kind, key = _key(trace, sticky, section.sticky_blocks, row, line)
        tokens = max(int(trace.input_tokens[row]), TEMPLATE_TOKENS)
        session = trace.session[row] if trace.session is not None else ""
        own_tenant = trace.tenant[row] if trace.tenant is not None else ""
        start, gap = float(times[position]), float(following[position] - times[position])
        for copy in range(count):
            sticky_key = (key_kind, key, copy)
            tenant = tenants[own_tenant] if own_tenant in tenants else tenants[tenant_pick(sticky_key)]
            suffix = f"x{copy}" if copy else ""
            plans.append(SessionPlan(
                f"r{line}{suffix}", tenant.name, tenant.api_key, tenant.workload, "trace", start + gap * copy / count, "",
                (CallPlan(0, models(row, sticky_key), "", "", int(trace.output_tokens[row])),), 0.0,
                user=f"{session}{suffix}" if session else "",
                task_prompt=TracePrompt(tokens, ids, line, _space(options.seed, copy)), request_class=tenant.request_class,
            ))  # fmt: skip
    plans.sort(key=lambda p: p.start)  # stable: equal starts keep the trace's order
    window_s = (min(end, trace.span_s) - options.window_start_s) if options.window_s is None else options.window_s
    if window_s <= 0:  # every row at one instant: rates are taken over that one second of the trace
        window_s = 1.0
    summary = _summary(trace, picked, plans, options, zero_output, padded=int((trace.input_tokens[sendable] < TEMPLATE_TOKENS).sum()))
    return Replay(plans=plans, duration_s=window_s / options.speed, summary=summary)


def _key(trace: Trace, sticky: str, blocks: int, row: int, line: int) -> tuple[str, str]:
    if sticky == "session" and trace.session is not None and trace.session[row]:
        return "session", trace.session[row]
    if sticky == "prefix" and trace.hash_ids[row]:
        return "prefix", str(trace.hash_ids[row][:blocks])
    return "row", str(line)


class _Models:
    """The fleet model of a row: its model column through `trace.models`, else the mix."""

    def __init__(self, column: list[str] | None, table: dict[str, str], mix: _Picker | None) -> None:
        self._column, self._table, self._mix = column, table, mix

    def __call__(self, row: int, sticky_key: tuple[str, str, int]) -> str:
        written = self._column[row] if self._column is not None else ""
        if written:
            return self._table.get(written, written)
        assert self._mix is not None  # _models checked that every row without a model has a mix
        return self._mix(sticky_key)


def _models(trace: Trace, section: TraceSpec, rows: np.ndarray, seed: int) -> _Models:
    mix = _Picker([m.model for m in section.mix], [m.weight for m in section.mix], "model", seed) if section.mix else None
    if mix is None:
        column = trace.model
        lacking = [int(trace.line[r]) for r in rows.tolist()] if column is None else [int(trace.line[r]) for r in rows.tolist() if not column[r]]
        if lacking:
            what = "has no model column" if column is None else f"has {len(lacking)} rows without a model"
            raise ReplayError(
                f"the {trace.format} trace {trace.source} {what} (first at line {lacking[0]}): give the models to send them to "
                "as `trace: {mix: [{model: NAME, weight: W}, ...]}` in the spec"
            )
    return _Models(trace.model, dict(section.models), mix)


def _summary(trace: Trace, picked: np.ndarray, plans: list[SessionPlan], options: ReplayOptions, zero_output: int, *, padded: int) -> TraceSummary:
    source = trace_stats(
        trace.time_s[picked], trace.input_tokens[picked], trace.output_tokens[picked], [trace.hash_ids[i] for i in picked.tolist()]
    )
    prompts = [p.task_prompt for p in plans]
    calls = [p.steps[0] for p in plans]
    sent = trace_stats(
        np.fromiter((p.start for p in plans), dtype=np.float64, count=len(plans)),
        np.fromiter((q.tokens for q in prompts if q is not None), dtype=np.int64, count=len(plans)),
        np.fromiter((c.max_tokens for c in calls if isinstance(c, CallPlan)), dtype=np.int64, count=len(plans)),
        [q.hash_ids for q in prompts if q is not None],
        [(c.model, q.space) for c, q in zip(calls, prompts) if isinstance(c, CallPlan) and q is not None],
    )
    per_model: dict[str, int] = {}
    for call in calls:
        if isinstance(call, CallPlan):
            per_model[call.model] = per_model.get(call.model, 0) + 1
    return TraceSummary(
        file=trace.source, format=trace.format, origin=trace.origin, file_rows=trace.rows, file_span_s=trace.span_s,
        window_start_s=options.window_start_s, window_s=options.window_s, speed=options.speed, rate_scale=options.rate_scale,
        zero_output_rows=zero_output, padded_rows=padded,
        models=dict(sorted(per_model.items())), source=source, sent=sent,
    )  # fmt: skip

