"""The suite's sequence: a fabric, load on it, then each fault in turn, then the verdict.

    start the fabric (faultkit.fabric) and wait for every node
    load: agent sessions (faultkit.load) + the registry writer (faultkit.ledger), throughout
    warm-up
    for each fault: steady period -> inject (faultkit.catalog) -> recovery period
        (the NATS outage runs with `streamers` extra closed-loop streams from its steady
        period to the end of its recovery: "under 200 concurrent streams")
    stop the load; let calls in flight end (or hang); read the routers' records
    one row per fault (faultkit.report)

`run_suite` returns the rows and writes nothing; `loadtest/faults.py` prints them and
the short form in `tests/faults/` asserts on them.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tierflow.harness import Fabric
from tierflow.runtime.admin_token import find_admin_token
from tierflow.workload.sessions import plan_sessions
from tierflow.workload.spec import load_spec

from . import fabric as fab
from .catalog import FAULTS, Ctx, Fault
from .ledger import Ledger
from .load import CallRecord, LoadDriver, Streamers, TokenBins, make_client
from .report import Expected, Row, Window, build_row
from .routerlog import read_router_records, watch_resumed

__all__ = ["SPEC", "SuiteConfig", "SuiteResult", "run_suite"]

SPEC = Path(__file__).resolve().parents[1] / "specs" / "faults.yaml"
STREAMER_MODELS = ("planner", "coder", "reader")


@dataclass
class SuiteConfig:
    faults: Sequence[str] = tuple(FAULTS)
    warmup_s: float = 15.0
    steady_s: float = 20.0
    recovery_s: float = 40.0
    rate_scale: float = 1.0
    hang_timeout_s: float = 90.0
    streamers: int = 200  # extra streams held open through the NATS outage
    streamer_tokens: int = 60
    layout: fab.Layout = field(default_factory=fab.Layout)
    spec: Path = SPEC
    data_dir: Path | None = None  # None: a temporary directory, removed afterwards

    def __post_init__(self) -> None:
        unknown = [f for f in self.faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")

    def duration_s(self) -> float:
        return self.warmup_s + len(self.faults) * (self.steady_s + self.recovery_s) + 60.0


@dataclass
class SuiteResult:
    rows: list[Row]
    calls: list[CallRecord]
    ledger: Ledger
    final_read_ok: bool
    hung_at_end: int  # calls still open when the load was stopped and the hang timeout had passed
    data_dir: Path
    started: float
    ended: float
    tokens_per_s: dict[int, int]  # delivered per wall second

    @property
    def passed(self) -> bool:
        return self.final_read_ok and self.hung_at_end == 0 and not self.ledger.lost and all(r.passed for r in self.rows)


async def _pause(seconds: float) -> None:
    await asyncio.sleep(max(0.0, seconds))


async def _drive(config: SuiteConfig, fabric: Fabric, say: Callable[[str], None]) -> SuiteResult:
    nc = await fab.connect(fabric, "faults-watch")
    watch = await fab.NodeWatch.attach(nc)
    await watch.wait_nodes(config.layout.expected_nodes(), timeout=120)
    say(f"every node beats: {', '.join(sorted(h.node_id for h in watch.live()))}")
    plans = plan_sessions(load_spec(config.spec), duration_s=config.duration_s(), rate_scale=config.rate_scale)
    client, pool = make_client(fabric.base_url, connections=2048, timeout=config.hang_timeout_s)
    bins, streamer_bins = TokenBins(), TokenBins()  # throughput is judged on the sessions' (open-loop) load
    driver = LoadDriver(client, plans, hang_timeout=config.hang_timeout_s, bins=bins)
    ledger = Ledger(f"{fabric.host}:{fabric.registry_grpc_port}", admin_token=find_admin_token("", fabric.data_dir))
    stop = asyncio.Event()
    started = time.time()
    load = asyncio.create_task(driver.run(stop, started))
    writer = asyncio.create_task(ledger.run(stop))
    ctx = Ctx(fabric, watch, say)
    windows: list[Window] = []
    streamer_records: list[CallRecord] = []
    streamer_open: list[Streamers] = []
    try:
        say(f"load: {config.spec.name} x{config.rate_scale:g}, registry writer every {ledger.interval:g}s; warm-up {config.warmup_s:g}s")
        await _pause(config.warmup_s)
        for name in config.faults:
            fault: Fault = FAULTS[name]
            start = time.time()
            extra_stop = asyncio.Event()
            extra: asyncio.Task[None] | None = None
            if fault.kind == "outage" and config.streamers:
                streamers = Streamers(client, config.streamers, STREAMER_MODELS, max_tokens=config.streamer_tokens, hang_timeout=config.hang_timeout_s, bins=streamer_bins)
                streamer_open.append(streamers)
                extra = asyncio.create_task(streamers.run(extra_stop))
                say(f"{fault.title}: {config.streamers} more streams open")
            say(f"{fault.title}: steady {config.steady_s:g}s")
            await _pause(config.steady_s)
            if extra is not None:
                say(f"  streams in flight: {len(driver.in_flight) + len(streamer_open[-1].in_flight)}")
            injection = await fault.inject(ctx)
            await _pause(injection.at + config.recovery_s - time.time())
            if extra is not None:
                extra_stop.set()
                await asyncio.wait({extra}, timeout=config.hang_timeout_s + 5)
                streamer_records += streamer_open[-1].records
            windows.append(Window(fault, start, injection.at, time.time(), injection))
    finally:
        stop.set()
        done, _ = await asyncio.wait({load, writer}, timeout=config.hang_timeout_s + 10)
        for task in (load, writer):
            if task not in done:
                task.cancel()
        hung_at_end = len(driver.in_flight) + sum(len(s.in_flight) for s in streamer_open)
        final_ok = await ledger.verify()
        await pool.aclose()
        await nc.close()
    calls = driver.records + streamer_records
    routers = read_router_records(fabric.data_dir / "logs")
    for w in windows:
        if w.fault.kind == "outage":
            w.injection.facts["router_log_watch_resumed_s"] = watch_resumed(fabric.data_dir / "logs", w.injection.facts["stopped_at"], w.injection.at)
    expected = Expected(driver.records)
    rows = [build_row(w, calls, routers, ledger, bins, expected) for w in windows]
    return SuiteResult(rows, calls, ledger, final_ok, hung_at_end, fabric.data_dir, started, time.time(), dict(bins.bins))


def run_suite(config: SuiteConfig, say: Callable[[str], None] = print) -> SuiteResult:
    """Start the fabric, run every fault of `config` under load, stop the fabric."""
    with tempfile.TemporaryDirectory(prefix="tierflow-faults-") as tmp:
        data = config.data_dir or Path(tmp)
        data.mkdir(parents=True, exist_ok=True)
        say(f"starting tierflow up: NATS cluster of {config.layout.nats_cluster}, {config.layout.routers} routers, data {data}")
        fabric = fab.start(data, config.layout)
        say(fabric.ready_line)
        try:
            return asyncio.run(_drive(config, fabric, say))
        finally:
            fabric.stop(timeout=30)
