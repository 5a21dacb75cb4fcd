"""The report of a run: latency percentiles, goodput, rates and cache behaviour, in total, per model and over time.

The live load generator and the simulator both hand their `RequestRecord`s to
`build_report`, so a live run and a simulation of the same spec produce the same JSON and
compare line by line. Every metric's meaning travels inside the JSON (`Report.definitions`)
so a report read months later still says what its numbers are.

Percentiles are numpy's default linear interpolation (`np.percentile(..., method="linear")`)
over ok requests; ITL is each request's mean inter-token latency, what vLLM calls TPOT.

The simulator may pass millions of records: each field is pulled out once into a numpy
column (C-level `map`, no per-record Python code) and every figure after that is array
arithmetic. `write_report` and `load_report` are
the module's only I/O; everything else is pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from tierflow.rdu.energy import JOULES_PER_KWH
from tierflow.workload.records import RequestRecord
from tierflow.workload.spec import Slo
from tierflow.workload.trace_stats import TraceSummary, measured_stats

__all__ = [
    "REPORT_FORMAT",
    "DEFINITIONS",
    "HOT_TIERS",
    "Percentiles",
    "Summary",
    "Window",
    "FleetSample",
    "ReportMeta",
    "Report",
    "ReportError",
    "build_report",
    "default_window_s",
    "write_report",
    "load_report",
]

REPORT_FORMAT = "tierflow-workload-report/1"
HOT_TIERS = frozenset({"hbm", "sram"})  # a model found here needed no load or switch
PERCENTILES = (50.0, 95.0, 99.0)

DEFINITIONS: dict[str, str] = {
    "percentiles": "numpy.percentile(values, q, method='linear') (numpy's default: linear interpolation "
    "between the two closest ranks); null when there is no sample",
    "ttft_ms": "time to first token, first_token_at - sent_at, over ok requests, in milliseconds",
    "itl_ms": "inter-token latency: each ok request's mean gap between output tokens, "
    "(finished_at - first_token_at) / (completion_tokens - 1), in milliseconds; vLLM calls this TPOT. "
    "Requests with fewer than 2 output tokens have none",
    "e2e_ms": "end to end latency, finished_at - sent_at, over ok requests, in milliseconds",
    "requests": "requests sent; ok + errors + rejected (rejected: 429/503 back-pressure or boundary)",
    "goodput_share": "requests that are ok and meet every SLO that is set (value <= target; a request "
    "without an ITL meets the ITL target), as a share of all requests sent",
    "goodput_rps": "those requests per second of meta.duration_s (per window: of the window)",
    "throughput_rps": "ok requests per second of meta.duration_s (per window: of the window)",
    "input_tokens_per_s": "prompt tokens of ok requests per second",
    "output_tokens_per_s": "completion tokens of ok requests per second",
    "cold_share": "ok requests whose model was not in a hot tier (hbm, sram) when served, as a share of "
    "the ok requests whose tier is known",
    "prefix_hit_rate": "sum(cached_tokens) / sum(prompt_tokens) over ok requests",
    "prefix_hit_share": "ok requests with at least one cached prompt token, as a share of ok requests",
    "nodes_per_session": "distinct nodes that served a session (any outcome, known nodes only), mean over "
    "the sessions with at least one known node; _p95 (linear) and _max alongside",
    "nodes_per_session_model": "distinct nodes that served one session's requests to one model (any outcome, "
    "known nodes only), mean over the (session, model) pairs with at least one known node; _max alongside. A "
    "session that calls two models needs at least two nodes only when no node serves both; within a model "
    "each extra node is a prefix cache the session left behind",
    "energy_j": "sum of energy_j over ok requests: each request's share of the node's energy (the "
    "emulator's power model, tierflow.rdu.energy); 0 when no node reported one",
    "tokens_per_kwh": "completion tokens of ok requests per kWh of their energy_j; null when no energy was "
    "reported",
    "timeline": "windows of window_s seconds from 0; a request belongs to the window it was SENT in, "
    "so its latency and tokens count there; the windows cover [0, max(meta.duration_s, last sent_at)), "
    "the last one possibly shorter",
    "fleet": "nodes, running, queued per window: the producer's fleet samples held until the next "
    "sample, averaged over the window's time (null where no sample covers the window)",
    "trace": "a trace replay only: the trace's own figures (source: the window's rows, trace seconds), the "
    "requests the replay planned (sent: run seconds, after speed and rate_scale) and what the records show "
    "(measured). rate_peak: most requests in one second from the first arrival; prefix_reuse: cached / prompt "
    "tokens with an unbounded cache at the emulator's 64-token blocks (measured: the run's own, over ok "
    "requests); see tierflow.workload.trace_stats",
}


class ReportError(ValueError):
    """A file that is not a report this version can read, or a run that cannot be reported."""


class Percentiles(msgspec.Struct, frozen=True):
    """Milliseconds; every field None when there was no sample (JSON null, never NaN)."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """One set of requests (the whole run or one model); `DEFINITIONS` holds each field's meaning.

    Latency percentiles are over ok requests only, in milliseconds: `ttft_ms` to the first
    token, `itl_ms` each request's mean inter-token latency (vLLM's TPOT; requests with one
    output token have none), `e2e_ms` to the last token.
    """

    requests: int
    ok: int
    errors: int
    rejected: int
    ttft_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    goodput_share: float | None
    goodput_rps: float
    throughput_rps: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    cold_share: float | None
    prefix_hit_rate: float | None
    prefix_hit_share: float | None
    nodes_per_session: float | None
    nodes_per_session_p95: float | None
    nodes_per_session_max: int | None
    sessions: int
    energy_j: float = 0.0
    tokens_per_kwh: float | None = None
    nodes_per_session_model: float | None = None
    nodes_per_session_model_max: int | None = None


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """One time bucket [start, end) of the timeline, keyed by `sent_at` (see DEFINITIONS["timeline"]).

    Latencies in milliseconds, rates per second of the window. `nodes`, `running` and
    `queued` stay None unless the producer passed a fleet timeline (the simulator does; a
    live client cannot see the fleet).
    """

    start: float
    end: float
    requests: int
    ok: int
    errors: int
    rejected: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    e2e_p50_ms: float | None
    e2e_p95_ms: float | None
    goodput_share: float | None
    goodput_rps: float
    throughput_rps: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    cold_share: float | None
    prefix_hit_rate: float | None
    nodes: float | None = None
    running: float | None = None
    queued: float | None = None


class FleetSample(NamedTuple):
    """The fleet at time `t` (seconds since the run's start), as a producer saw it.

    A plain tuple `(t, nodes, running, queued)` works too. Each sample holds until the next
    one, so irregular sampling (e.g. only when something changed) averages correctly.
    """

    t: float
    nodes: float
    running: float
    queued: float


class ReportMeta(msgspec.Struct, frozen=True):
    """Where a report came from: which spec, live or simulated, which routing/scaling policy.

    `duration_s` is the run's length the rates are taken over (the spec's duration, or the
    virtual time simulated); `wall_s` the real seconds it took; `started_at` an ISO 8601
    timestamp; `notes` anything else worth keeping (seed, fleet file, node count ...).
    """

    spec: str
    source: Literal["live", "sim"]
    policy: str
    duration_s: float
    wall_s: float
    started_at: str
    notes: dict[str, str | float | int] = {}


class Report(msgspec.Struct, frozen=True):
    meta: ReportMeta
    totals: Summary
    per_model: dict[str, Summary]
    timeline: list[Window]
    window_s: float
    slo: Slo = Slo()
    definitions: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFINITIONS))
    format: str = REPORT_FORMAT
    trace: TraceSummary | None = None  # set when the run replayed a trace


FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def _floats(records: Sequence[RequestRecord], field: str) -> FloatArray:
    """A float column; None (a time that never came) becomes NaN."""
    return np.array(list(map(attrgetter(field), records)), dtype=np.float64)


def _ints(records: Sequence[RequestRecord], field: str) -> IntArray:
    return np.fromiter(map(attrgetter(field), records), dtype=np.int64, count=len(records))


def _factorize(records: Sequence[RequestRecord], field: str) -> tuple[IntArray, list[str]]:
    """Integer codes of a string column (first-seen order), without a Python-level loop per record."""
    values = list(map(attrgetter(field), records))
    names = list(dict.fromkeys(values))
    code = {name: i for i, name in enumerate(names)}
    return np.fromiter(map(code.__getitem__, values), dtype=np.int64, count=len(values)), names


def _distinct(keys: IntArray) -> IntArray:
    """Sorted distinct keys. Sort-based: np.unique's hash path (numpy 2.3+) measured ~100x slower
    on 500k int64 keys (0.4 s against 4 ms)."""
    ordered = np.sort(keys)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if ordered.size else ordered


def _mask_of(codes: IntArray, names: list[str], wanted: Iterable[str]) -> BoolArray:
    wanted_set = set(wanted)
    return np.isin(codes, [i for i, name in enumerate(names) if name in wanted_set])


class _Columns:
    """The records as numpy columns, plus the per-request figures every summary needs."""

    def __init__(self, records: Sequence[RequestRecord], slo: Slo) -> None:
        self.size = len(records)
        self.sent = _floats(records, "sent_at")
        first_at, finished_at = _floats(records, "first_token_at"), _floats(records, "finished_at")
        self.prompt, self.completion = _ints(records, "prompt_tokens"), _ints(records, "completion_tokens")
        self.cached = _ints(records, "cached_tokens")
        self.energy = _floats(records, "energy_j")
        outcome_codes, outcome_names = _factorize(records, "outcome")
        self.ok = _mask_of(outcome_codes, outcome_names, ["ok"])
        self.error = _mask_of(outcome_codes, outcome_names, ["error"])
        self.rejected = _mask_of(outcome_codes, outcome_names, ["rejected"])
        self.model, self.model_names = _factorize(records, "model")
        tier_codes, tier_names = _factorize(records, "tier")
        self.ok_tier_known = self.ok & ~_mask_of(tier_codes, tier_names, [""])
        self.ok_cold = self.ok_tier_known & ~_mask_of(tier_codes, tier_names, HOT_TIERS)
        self.session, session_names = _factorize(records, "session_id")
        self.session_count = len(session_names)
        self.node, node_names = _factorize(records, "node")
        self.node_count = len(node_names)
        node_known = ~_mask_of(self.node, node_names, [""])
        # Distinct (session, node, model) once: a model's distinct session/node keys are then a
        # filter, and the whole run's a de-duplication of a far smaller array.
        models = max(len(self.model_names), 1)
        key = (self.session * self.node_count + self.node) * models + self.model
        distinct = _distinct(key[node_known])
        self.key_model, self.key_session_node = distinct % models, distinct // models
        self.key_session_model = (self.key_session_node // max(self.node_count, 1)) * models + self.key_model

        with np.errstate(invalid="ignore", divide="ignore"):
            self.ttft_ms = np.where(self.ok, (first_at - self.sent) * 1e3, np.nan)
            self.e2e_ms = np.where(self.ok, (finished_at - self.sent) * 1e3, np.nan)
            decode_ms = (finished_at - first_at) * 1e3 / (self.completion - 1)
            self.itl_ms = np.where(self.ok & (self.completion >= 2), decode_ms, np.nan)
        good = self.ok.copy()
        if slo.ttft_ms is not None:
            good &= self.ttft_ms <= slo.ttft_ms  # NaN (no first token) compares False: not good
        if slo.itl_ms is not None:
            good &= (self.completion < 2) | (self.itl_ms <= slo.itl_ms)
        if slo.e2e_ms is not None:
            good &= self.e2e_ms <= slo.e2e_ms
        self.good = good


def _share(part: float, whole: float) -> float | None:
    return None if whole == 0 else float(part) / float(whole)


def _percentiles(values: FloatArray) -> Percentiles:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Percentiles()
    p50, p95, p99 = np.percentile(values, PERCENTILES, method="linear")
    return Percentiles(p50=float(p50), p95=float(p95), p99=float(p99), mean=float(values.mean()))


def _nodes_per_session(pairs: IntArray, node_count: int) -> tuple[float | None, float | None, int | None]:
    """Mean, p95 and max distinct nodes per session, from DISTINCT session*node_count+node keys."""
    if pairs.size == 0:
        return None, None, None
    per_session = np.bincount(pairs // node_count)
    per_session = per_session[per_session > 0]
    p95 = float(np.percentile(per_session, 95.0, method="linear"))
    return float(per_session.mean()), p95, int(per_session.max())


def _nodes_per_session_model(pairs: IntArray) -> tuple[float | None, int | None]:
    """Mean and max distinct nodes per (session, model), from one session*models+model key per
    DISTINCT (session, node, model): a pair's count of keys is its count of nodes."""
    if pairs.size == 0:
        return None, None
    per_pair = np.bincount(pairs)
    per_pair = per_pair[per_pair > 0]
    return float(per_pair.mean()), int(per_pair.max())


def _summarize(cols: _Columns, mask: BoolArray, session_nodes: IntArray, duration_s: float, session_models: IntArray) -> Summary:
    """`session_nodes`: the distinct session/node keys of the requests in `mask`; `session_models`:
    the session/model key of each of their distinct (session, node, model) triples (see _Columns)."""
    ok = mask & cols.ok
    n_ok = int(ok.sum())
    requests = int(mask.sum())
    prompt_ok = int(cols.prompt[ok].sum())
    good = int((mask & cols.good).sum())
    completion_ok = int(cols.completion[ok].sum())
    energy = float(cols.energy[ok].sum())
    nodes_mean, nodes_p95, nodes_max = _nodes_per_session(session_nodes, cols.node_count)
    pair_mean, pair_max = _nodes_per_session_model(session_models)
    return Summary(
        requests=requests,
        ok=n_ok,
        errors=int((mask & cols.error).sum()),
        rejected=int((mask & cols.rejected).sum()),
        ttft_ms=_percentiles(cols.ttft_ms[ok]),
        itl_ms=_percentiles(cols.itl_ms[ok]),
        e2e_ms=_percentiles(cols.e2e_ms[ok]),
        goodput_share=_share(good, requests),
        goodput_rps=good / duration_s,
        throughput_rps=n_ok / duration_s,
        input_tokens_per_s=prompt_ok / duration_s,
        output_tokens_per_s=completion_ok / duration_s,
        cold_share=_share(int((mask & cols.ok_cold).sum()), int((mask & cols.ok_tier_known).sum())),
        prefix_hit_rate=_share(int(cols.cached[ok].sum()), prompt_ok),
        prefix_hit_share=_share(int((ok & (cols.cached > 0)).sum()), n_ok),
        nodes_per_session=nodes_mean,
        nodes_per_session_p95=nodes_p95,
        nodes_per_session_max=nodes_max,
        sessions=int(np.count_nonzero(np.bincount(cols.session[mask], minlength=cols.session_count))),
        energy_j=energy,
        tokens_per_kwh=completion_ok * JOULES_PER_KWH / energy if energy > 0 else None,
        nodes_per_session_model=pair_mean,
        nodes_per_session_model_max=pair_max,
    )


_NICE_WINDOWS_S = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600)


def default_window_s(duration_s: float) -> float:
    """About 60 windows per run: duration/60 rounded UP to 1, 2, 5, 10, 15, 20, 30 s, 1, 2, 5,
    10, 15, 30 min or whole hours, so the plots have round tick steps and at most ~60 points."""
    raw = duration_s / 60.0
    for nice in _NICE_WINDOWS_S:
        if raw <= nice:
            return float(nice)
    return 3600.0 * math.ceil(raw / 3600.0)


def _grouped_percentiles(window: IntArray, values: FloatArray, n_windows: int, qs: Sequence[float]) -> FloatArray:
    """Percentiles of `values` per window index (NaN rows for windows without a sample)."""
    keep = ~np.isnan(values)
    window, values = window[keep], values[keep]
    order = np.argsort(window, kind="stable")
    window, values = window[order], values[order]
    bounds = np.searchsorted(window, np.arange(n_windows + 1))
    out = np.full((n_windows, len(qs)), np.nan)
    for i in range(n_windows):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            out[i] = np.percentile(values[lo:hi], qs, method="linear")
    return out


def _fleet_means(samples: Sequence[FleetSample | tuple[float, float, float, float]], starts: FloatArray, ends: FloatArray) -> FloatArray:
    """Time-weighted mean of each fleet column over each window, the samples held as steps.

    Shape (windows, 3) for nodes, running, queued; NaN where the window ends before the first sample.
    """
    try:
        table = np.array(samples, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ReportError(f"fleet_timeline: each sample must be (t, nodes, running, queued) numbers ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != 4:
        raise ReportError(f"fleet_timeline: each sample must be (t, nodes, running, queued); got an array of shape {table.shape}")
    table = table[np.argsort(table[:, 0], kind="stable")]
    t, values = table[:, 0], table[:, 1:]
    integral_at_t = np.vstack([np.zeros((1, 3)), np.cumsum(values[:-1] * np.diff(t)[:, None], axis=0)])

    def integral(x: FloatArray) -> FloatArray:
        k = np.searchsorted(t, x, side="right") - 1
        return integral_at_t[k] + values[k] * (x - t[k])[:, None]

    lo = np.maximum(starts, t[0])
    covered = ends > lo
    out = np.full((starts.size, 3), np.nan)
    if covered.any():
        span = (ends[covered] - lo[covered])[:, None]
        out[covered] = (integral(ends[covered]) - integral(lo[covered])) / span
    return out


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _timeline(
    cols: _Columns,
    duration_s: float,
    window_s: float,
    fleet_timeline: Sequence[FleetSample | tuple[float, float, float, float]] | None,
) -> list[Window]:
    horizon = max(duration_s, float(cols.sent.max()) if cols.size else 0.0)
    n = max(1, math.ceil(horizon / window_s))
    if n > 1 and (n - 1) * window_s >= horizon:  # float division overshot by one window
        n -= 1
    starts = np.arange(n, dtype=np.float64) * window_s
    ends = np.minimum(starts + window_s, horizon)
    span = ends - starts  # > 0: the last window starts before the horizon
    index = np.clip(np.floor(cols.sent / window_s), 0, n - 1).astype(np.int64)

    def per_window(weights: npt.NDArray[np.generic] | None = None) -> FloatArray:
        return np.bincount(index, weights=weights, minlength=n).astype(np.float64)

    requests, ok = per_window(), per_window(cols.ok)
    errors, rejected, good = per_window(cols.error), per_window(cols.rejected), per_window(cols.good)
    prompt_ok, completion_ok = per_window(np.where(cols.ok, cols.prompt, 0)), per_window(np.where(cols.ok, cols.completion, 0))
    cached_ok = per_window(np.where(cols.ok, cols.cached, 0))
    cold, tier_known = per_window(cols.ok_cold), per_window(cols.ok_tier_known)
    ttft = _grouped_percentiles(index, cols.ttft_ms, n, PERCENTILES)
    itl = _grouped_percentiles(index, cols.itl_ms, n, PERCENTILES[:2])
    e2e = _grouped_percentiles(index, cols.e2e_ms, n, PERCENTILES[:2])
    fleet = np.full((n, 3), np.nan)
    if fleet_timeline is not None and len(fleet_timeline) > 0:
        fleet = _fleet_means(fleet_timeline, starts, ends)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 -> NaN -> None: a window without a sample
        goodput_share, cold_share, hit_rate = good / requests, cold / tier_known, cached_ok / prompt_ok
    return [
        Window(
            start=float(starts[i]),
            end=float(ends[i]),
            requests=int(requests[i]),
            ok=int(ok[i]),
            errors=int(errors[i]),
            rejected=int(rejected[i]),
            ttft_p50_ms=_optional(ttft[i, 0]),
            ttft_p95_ms=_optional(ttft[i, 1]),
            ttft_p99_ms=_optional(ttft[i, 2]),
            itl_p50_ms=_optional(itl[i, 0]),
            itl_p95_ms=_optional(itl[i, 1]),
            e2e_p50_ms=_optional(e2e[i, 0]),
            e2e_p95_ms=_optional(e2e[i, 1]),
            goodput_share=_optional(goodput_share[i]),
            goodput_rps=float(good[i] / span[i]),
            throughput_rps=float(ok[i] / span[i]),
            input_tokens_per_s=float(prompt_ok[i] / span[i]),
            output_tokens_per_s=float(completion_ok[i] / span[i]),
            cold_share=_optional(cold_share[i]),
            prefix_hit_rate=_optional(hit_rate[i]),
            nodes=_optional(fleet[i, 0]),
            running=_optional(fleet[i, 1]),
            queued=_optional(fleet[i, 2]),
        )
        for i in range(n)
    ]


def build_report(
    records: Iterable[RequestRecord],
    *,
    slo: Slo,
    meta: ReportMeta,
    window_s: float | None = None,
    fleet_timeline: Sequence[FleetSample | tuple[float, float, float, float]] | None = None,
    trace: TraceSummary | None = None,
) -> Report:
    """The report of one run: totals, one summary per model, and a timeline of windows.

    Rates are per second of `meta.duration_s`. `window_s` defaults to `default_window_s`.
    A producer that knows its fleet (the simulator) passes `fleet_timeline` as
    `(t, nodes, running, queued)` samples to fill the windows' fleet columns. A replay
    passes its `trace` summary; the report adds the figures measured from `records`.
    """
    if not meta.duration_s > 0:
        raise ReportError(f"meta.duration_s must be > 0 seconds (rates are taken over it), got {meta.duration_s!r}")
    if window_s is not None and not window_s > 0:
        raise ReportError(f"window_s must be > 0 seconds, got {window_s!r}")
    cols = _Columns(records if isinstance(records, Sequence) else list(records), slo)
    everyone = np.ones(cols.size, dtype=np.bool_)
    per_model = {
        name: _summarize(
            cols, cols.model == code, cols.key_session_node[cols.key_model == code], meta.duration_s,
            cols.key_session_model[cols.key_model == code],
        )
        for code, name in sorted(enumerate(cols.model_names), key=lambda pair: pair[1])
    }
    window = window_s if window_s is not None else default_window_s(meta.duration_s)
    return Report(
        meta=meta,
        totals=_summarize(cols, everyone, _distinct(cols.key_session_node), meta.duration_s, cols.key_session_model),
        per_model=per_model,
        timeline=_timeline(cols, meta.duration_s, window, fleet_timeline),
        window_s=window,
        slo=slo,
        trace=msgspec.structs.replace(trace, measured=measured_stats(cols.sent, cols.prompt, cols.completion, cols.cached, cols.ok))
        if trace is not None
        else None,
    )


def write_report(report: Report, path: str | Path) -> Path:
    """Indented JSON, so a report diffs well in review and reads without tools."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    return target


def load_report(path: str | Path) -> Report:
    """A report written by `write_report`; ReportError names the file and what is wrong in it."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ReportError(f"{source}: cannot read the report ({exc.strerror or exc})") from exc
    try:
        report = msgspec.json.decode(data, type=Report)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError; its message carries the $.path
        raise ReportError(f"{source}: not a tierflow workload report ({exc})") from exc
    if report.format != REPORT_FORMAT:
        raise ReportError(f"{source}: report format {report.format!r}, this tierflow reads {REPORT_FORMAT!r}")
    return report
