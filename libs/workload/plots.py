"""PNG plots of a report's timeline: latency, throughput and goodput, cache behaviour, fleet.

matplotlib is imported inside `write_plots` (and drawn through the Agg canvas directly, no
pyplot global state), so `import tierflow.workload` stays light and plotting is safe from
any thread. Each point is one window, drawn at the window's middle; a window without a
sample (None) leaves a gap rather than a misleading zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tierflow.workload.report import Report, Window

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["write_plots"]

Series = tuple[str, Callable[[Window], float | None]]


def _values(windows: Sequence[Window], pick: Callable[[Window], float | None]) -> list[float]:
    return [float("nan") if (value := pick(w)) is None else value for w in windows]


def _draw(ax: Axes, report: Report, series: Sequence[Series], *, title: str, ylabel: str) -> None:
    middles = [(w.start + w.end) / 2 for w in report.timeline]
    for label, pick in series:
        ax.plot(middles, _values(report.timeline, pick), marker=".", label=label)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _figure(rows: int) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, report: Report, path: Path, what: str) -> Path:
    meta = report.meta
    figure.axes[-1].set_xlabel(f"time since start (s); {report.window_s:g} s windows, each request in the one it was sent in")
    figure.suptitle(f"{what}: {meta.spec} ({meta.source}, policy {meta.policy or '-'})")
    figure.savefig(path, format="png", dpi=100)
    return path


def _latency(report: Report, path: Path) -> Path:
    figure = _figure(3)
    ttft, itl, e2e = figure.subplots(3, 1, sharex=True)
    _draw(ttft, report, [("p50", lambda w: w.ttft_p50_ms), ("p95", lambda w: w.ttft_p95_ms), ("p99", lambda w: w.ttft_p99_ms)],
          title="time to first token (ok requests)", ylabel="TTFT (ms)")  # fmt: skip
    _draw(itl, report, [("p50", lambda w: w.itl_p50_ms), ("p95", lambda w: w.itl_p95_ms)],
          title="inter-token latency, per-request mean (vLLM TPOT)", ylabel="ITL (ms)")  # fmt: skip
    _draw(e2e, report, [("p50", lambda w: w.e2e_p50_ms), ("p95", lambda w: w.e2e_p95_ms)],
          title="end-to-end latency (ok requests)", ylabel="E2E (ms)")  # fmt: skip
    return _save(figure, report, path, "latency")


def _throughput(report: Report, path: Path) -> Path:
    figure = _figure(2)
    requests, tokens = figure.subplots(2, 1, sharex=True)
    _draw(requests, report, [
        ("sent", lambda w: w.requests / (w.end - w.start)),
        ("ok (throughput)", lambda w: w.throughput_rps),
        ("meeting every SLO (goodput)", lambda w: w.goodput_rps),
    ], title="requests per second", ylabel="requests/s")  # fmt: skip
    _draw(tokens, report, [("input (prompt)", lambda w: w.input_tokens_per_s), ("output (completion)", lambda w: w.output_tokens_per_s)],
          title="tokens per second of ok requests", ylabel="tokens/s")  # fmt: skip
    return _save(figure, report, path, "throughput and goodput")


def _cache(report: Report, path: Path) -> Path:
    figure = _figure(1)
    ax = figure.subplots()
    _draw(ax, report, [
        ("cold share (model not in HBM/SRAM)", lambda w: w.cold_share),
        ("prefix hit rate (cached / prompt tokens)", lambda w: w.prefix_hit_rate),
        ("goodput share", lambda w: w.goodput_share),
    ], title="cold starts, prefix cache and goodput share", ylabel="share (0-1)")  # fmt: skip
    ax.set_ylim(-0.02, 1.02)
    return _save(figure, report, path, "cache and placement")


def _fleet(report: Report, path: Path) -> Path:
    figure = _figure(2)
    nodes, load = figure.subplots(2, 1, sharex=True)
    _draw(nodes, report, [("nodes", lambda w: w.nodes)], title="fleet size (time-weighted mean per window)", ylabel="nodes")
    _draw(load, report, [("running", lambda w: w.running), ("queued", lambda w: w.queued)],
          title="requests running and queued across the fleet", ylabel="requests")  # fmt: skip
    return _save(figure, report, path, "fleet")


def write_plots(report: Report, directory: str | Path) -> list[Path]:
    """latency.png, throughput.png, cache.png, and fleet.png when the report has fleet columns."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = [
        _latency(report, target / "latency.png"),
        _throughput(report, target / "throughput.png"),
        _cache(report, target / "cache.png"),
    ]
    if any(w.nodes is not None or w.running is not None or w.queued is not None for w in report.timeline):
        written.append(_fleet(report, target / "fleet.png"))
    return written
