"""Load at a given multiple of a spec's rate, measured: goodput, TTFT, refusals; and a ramp to find capacity.

`phase` runs the spec's sessions at `scale` x its arrival rate for `seconds` (open loop,
`faultkit.load.LoadDriver`), then gives calls still open `grace` seconds and cancels the
rest (a call that has not started within the SLO by then is not good, whatever it
would have become). `Phase` summarises what clients saw:

- goodput: calls that completed ok (exact token count) with TTFT within the SLO, per
  second of the phase (the issue: "requests completed within the SLO per second");
- admitted: calls that got a stream (their TTFT p50/p95); refused: calls answered 429
  or 503, with how long the refusal took (p50/p99) and whether it carried Retry-After;
- failed: anything else (errors, broken streams, wrong counts), hung or cut off.

`ramp` steps the scale up until a step misses the SLO (p95 TTFT over it, or fewer than
`ok_share` of its calls ok); capacity is the last scale that held, as calls per second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierflow.workload.sessions import plan_sessions
from tierflow.workload.spec import load_spec

from .load import CallRecord, LoadDriver, TokenBins, make_client

__all__ = ["Phase", "phase", "ramp", "summarize"]


@dataclass
class Phase:
    label: str
    scale: float
    seconds: float
    sent: int
    offered_per_s: float
    ok: int
    good: int
    goodput_per_s: float
    admitted: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    refused: int
    refusal_p50_ms: float | None
    refusal_p99_ms: float | None
    refused_with_retry_after: int
    failed: int
    cut_off: int  # still open at the end of the grace: counted as neither ok nor good
    tokens_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize(label: str, scale: float, seconds: float, calls: Sequence[CallRecord], slo_ttft_s: float) -> Phase:
    cut_off = sum(c.outcome == "cut" for c in calls)
    ttfts = [c.first - c.sent for c in calls if c.first is not None]
    ok = [c for c in calls if c.outcome == "ok"]
    good = [c for c in ok if c.first is not None and c.first - c.sent <= slo_ttft_s]
    refused = [c for c in calls if c.status in (429, 503) and c.first is None and c.outcome == "failed"]
    refusal_ms = [1000 * ((c.done or c.sent) - c.sent) for c in refused]
    failed = [c for c in calls if c.outcome not in ("ok", "cut") and c not in refused]
    tokens = sum(c.text_tokens for c in calls)
    sent = len(calls)
    return Phase(
        label, scale, seconds, sent, sent / seconds, len(ok), len(good), len(good) / seconds, len(ttfts), _pct(ttfts, 50), _pct(ttfts, 95),
        len(refused), _pct(refusal_ms, 50), _pct(refusal_ms, 99), sum(c.retry_after is not None for c in refused), len(failed), cut_off,
        tokens / seconds,
    )  # fmt: skip


async def phase(base_url: str, spec: Path, scale: float, seconds: float, *, slo_ttft_s: float, grace: float, label: str = "", seed: int | None = None) -> Phase:
    """`spec` at `scale` x its rate for `seconds` against `base_url`, summarised."""
    plans = plan_sessions(load_spec(spec), duration_s=seconds, rate_scale=scale, seed=seed)
    client, pool = make_client(base_url, connections=4096, timeout=seconds + grace + 60)
    driver = LoadDriver(client, plans, hang_timeout=seconds + grace + 30, bins=TokenBins())
    stop = asyncio.Event()
    started = time.time()
    run = asyncio.create_task(driver.run(stop, started))
    await asyncio.sleep(seconds)
    stop.set()  # no new sessions or steps; calls in flight may finish within the grace
    done, _ = await asyncio.wait({run}, timeout=grace)
    if run not in done:
        run.cancel()  # the calls still open are recorded as `cut`
        await asyncio.gather(run, return_exceptions=True)
    await pool.aclose()
    return summarize(label or f"x{scale:g}", scale, seconds, driver.records, slo_ttft_s)


async def ramp(
    base_url: str, spec: Path, scales: Sequence[float], step_s: float, *, slo_ttft_s: float, ok_share: float = 0.99,
    say: Callable[[str], None] = print,
) -> tuple[float | None, list[Phase]]:
    """(capacity in calls/s, every step): scales in order until one misses the SLO."""
    steps: list[Phase] = []
    capacity = None
    for scale in scales:
        step = await phase(base_url, spec, scale, step_s, slo_ttft_s=slo_ttft_s, grace=slo_ttft_s + 30, label=f"ramp x{scale:g}")
        steps.append(step)
        held = step.ttft_p95_s is not None and step.ttft_p95_s <= slo_ttft_s and step.ok >= ok_share * step.sent
        say(f"  ramp x{scale:g}: {step.offered_per_s:.2f} calls/s offered, {step.ok}/{step.sent} ok, TTFT p95 {step.ttft_p95_s}s, "
            f"goodput {step.goodput_per_s:.2f}/s -> {'holds' if held else 'misses the SLO'}")  # fmt: skip
        if not held:
            break
        capacity = step.offered_per_s
    return capacity, steps
