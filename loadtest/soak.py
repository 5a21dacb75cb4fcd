"""Soak: the whole fabric for 30 minutes at 70% of capacity; memory, files and subscriptions must stay flat.

Starts the fault suite's fabric (`tierflow up --nats-cluster 3 --routers 2` on
loadtest/fleets/faults.yaml: 3 NATS servers, 2 routers, the registry, the autoscaler, 4
decode and 3 prefill nodes), finds capacity for its load (loadtest/specs/faults.yaml:
agent sessions over three models) with a short ramp (or takes --capacity-scale), then
runs the load at --load (70%) of it for --minutes. Every --interval seconds it samples,
for every process `tierflow up` runs (DATA/children.json): RSS (/proc/PID/status VmRSS),
open files (/proc/PID/fd); and for every NATS client, by connection name: its
subscriptions (each member's monitoring endpoint /connz?subs=1, summed over members),
plus each server's total (/subsz).

Prints one line per series: first, last, min, max, the least-squares slope per hour and
whether it is flat. Not flat means a trend that is both real and large: over the
measured span (after the first --warm-up-share of it, when caches fill and pools grow
to their working size) the slope is significant (t > 3: noise, such as a router's
client connections coming and going, is not a trend) and the rise it implies exceeds a
tolerance: 5% of the series' mean or 8 MiB for RSS, 5% or 3 for open files and
subscriptions. Each node's prefix-cache blocks (its heartbeats) are sampled beside its
RSS: a cache may grow (an RDU node's DDR tier holds ~10^5-10^6 blocks, hours of this
load), a leak may not. So a node's RSS is judged less what its cache holds
(`rss_less_cache_mib`: RSS minus blocks x the host bytes one cached block costs the
emulator, measured as a fresh process's RSS growth while a real `KVCache` fills, not
fitted to the soak); its raw RSS is printed beside it. Writes the samples (JSON) and a PNG (RSS,
files, subscriptions over time) under --out (docs/faults/ by default). Exit status 1 if a series is not flat, a
call hung, or a process restarted.

    .venv/bin/python loadtest/soak.py                 # 30 minutes
    .venv/bin/python loadtest/soak.py --minutes 3 --interval 10 --capacity-scale 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultkit import fabric as fab  # noqa: E402
from faultkit.capacity import phase, ramp  # noqa: E402
from faultkit.run import SPEC  # noqa: E402

from tierflow.harness import Fabric  # noqa: E402
from tierflow.runtime.nats_server import http_get  # noqa: E402
from tierflow.workload.spec import load_spec  # noqa: E402

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "faults"
TOLERANCE = {"rss_mib": (0.05, 8.0), "rss_less_cache_mib": (0.05, 8.0), "open_files": (0.05, 3.0), "nats_subs": (0.05, 3.0)}
T_SIGNIFICANT = 3.0  # a slope this many standard errors above 0 is a trend, not noise
INFO = ("prefix_blocks", "rss_with_cache_mib")  # sampled and plotted, not judged


@dataclass
class Samples:
    """series key (metric, who) -> [(seconds since start, value)]."""

    t0: float
    series: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    def add(self, metric: str, who: str, value: float) -> None:
        self.series.setdefault((metric, who), []).append((time.time() - self.t0, value))


def _proc(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, open files) of `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None


async def sample(fabric: Fabric, samples: Samples, watch: fab.NodeWatch) -> None:
    for node in watch.live():
        samples.add("prefix_blocks", node.node_id, float(node.prefix_blocks))
    for child in fabric.children():
        samples.restarts[child.name] = child.restarts
        got = _proc(child.pid) if child.state == "running" else None
        if got is not None:
            samples.add("rss_mib", child.name, got[0])
            samples.add("open_files", child.name, got[1])
    subs: dict[str, int] = {}
    for member in fabric.nats_members():
        try:
            connz = json.loads((await http_get(fabric.host, member.monitor_port, "/connz?subs=1&limit=4096", timeout=3.0)).body)
            subsz = json.loads((await http_get(fabric.host, member.monitor_port, "/subsz", timeout=3.0)).body)
        except (OSError, ValueError):
            continue
        for conn in connz.get("connections", []):
            name = conn.get("name") or f"unnamed:{conn.get('cid')}"
            count = conn.get("subscriptions", len(conn.get("subscriptions_list") or []))
            subs[name] = subs.get(name, 0) + int(count)
        samples.add("nats_subs", f"{member.name} (server total)", float(subsz.get("num_subscriptions", 0)))
    for name, n in subs.items():
        if name.startswith("faults-") or name.startswith("soak-"):
            continue  # the soak's own connection
        samples.add("nats_subs", name, float(n))


@dataclass
class Verdict:
    metric: str
    who: str
    first: float
    last: float
    low: float
    high: float
    slope_per_h: float
    rise: float
    tolerance: float
    t_stat: float

    @property
    def flat(self) -> bool:
        return self.rise <= self.tolerance or self.t_stat <= T_SIGNIFICANT


def _measure_block_bytes(blocks: int) -> float:
    from tierflow.rdu.kvcache import KVCache, block_hashes
    from tierflow.rdu.memory import TransferLedger

    cache = KVCache(block_size=16, hbm_bytes=1 << 50, ddr_bytes=1 << 50, copy_bw=1e12, ledger=TransferLedger())
    prompts = [block_hashes(list(range(i * 1600, (i + 1) * 1600)), 16) for i in range(blocks // 100)]
    def rss_mib() -> float:
        got = _proc(os.getpid())
        assert got is not None
        return got[0]

    before = rss_mib()
    for hashes in prompts:
        alloc = cache.allocate("m", 1 << 20, hashes, len(hashes))
        assert alloc is not None
        cache.commit(alloc)
        cache.release(alloc)
    return (rss_mib() - before) * 2**20 / (len(prompts) * 100)


def cache_bytes_per_block(blocks: int = 200_000) -> float:
    """Host bytes one cached prefix block costs a node (its `KVCache` entry, index and LRU
    slot, with the allocator's own overhead), measured, not fitted: a fresh process
    commits `blocks` blocks the way finished prompts do and reports its RSS growth."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_block_bytes, blocks).result()


def subtract_cache(samples: Samples, bytes_per_block: float) -> None:
    """A node's RSS series becomes `rss_with_cache_mib` (shown, not judged) and
    `rss_less_cache_mib` (judged): RSS minus its cache's blocks at the nearest sample."""
    for (metric, who), points in list(samples.series.items()):
        blocks = samples.series.get(("prefix_blocks", who))
        if metric != "rss_mib" or not blocks:
            continue
        bt = np.array([p[0] for p in blocks])
        less = []
        for t, rss in points:
            nearest = int(np.abs(bt - t).argmin())
            if abs(bt[nearest] - t) <= 5.0:
                less.append((t, rss - blocks[nearest][1] * bytes_per_block / 2**20))
        samples.series[("rss_with_cache_mib", who)] = samples.series.pop((metric, who))
        samples.series[("rss_less_cache_mib", who)] = less


def _slope(t: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and its t statistic (0 when the series is constant)."""
    if np.ptp(t) == 0:
        return 0.0, 0.0
    slope, intercept = np.polyfit(t, v, 1)
    residual = v - (slope * t + intercept)
    spread = float(((t - t.mean()) ** 2).sum())
    if len(t) < 3 or spread == 0:
        return float(slope), 0.0
    stderr = float(np.sqrt((residual**2).sum() / (len(t) - 2) / spread))
    return float(slope), (float(slope) / stderr if stderr > 0 else (float("inf") if slope > 0 else 0.0))


def judge(samples: Samples, warm_up_share: float) -> list[Verdict]:
    out = []
    for (metric, who), points in sorted(samples.series.items()):
        if len(points) < 3 or metric in INFO:
            continue
        t = np.array([p[0] for p in points])
        v = np.array([p[1] for p in points])
        keep = t >= t[0] + warm_up_share * (t[-1] - t[0])
        if keep.sum() < 3:
            keep[:] = True
        slope, t_stat = _slope(t[keep], v[keep])
        rise = slope * float(np.ptp(t[keep]))
        share, floor = TOLERANCE[metric]
        out.append(Verdict(metric, who, float(v[0]), float(v[-1]), float(v.min()), float(v.max()), slope * 3600, rise,
                           max(floor, share * float(v[keep].mean())), t_stat))  # fmt: skip
    return out


def plot(samples: Samples, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rss_mib", False, "RSS (MiB)\nservices, NATS"), ("rss_with_cache_mib", False, "nodes' RSS (MiB)"),
              ("prefix_blocks", False, "prefix-cache blocks\n(per node)"), ("rss_less_cache_mib", False, "nodes' RSS less\ntheir cache (MiB)"),
              ("open_files", False, "open files"),
              ("nats_subs", False, "NATS subscriptions\n(per client)"), ("nats_subs", True, "NATS subscriptions\n(per server)")]  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 22), sharex=True)
    for ax, (metric, servers, label) in zip(axes, panels, strict=True):
        for (m, who), points in sorted(samples.series.items()):
            if m == metric and who.endswith("(server total)") == servers:
                ax.plot([p[0] / 60 for p in points], [p[1] for p in points], lw=0.9, label=who)
        ax.set_ylabel(label)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def soak(fabric: Fabric, args: argparse.Namespace, say) -> tuple[Samples, dict, float]:  # type: ignore[no-untyped-def]
    slo = (load_spec(SPEC).slo.ttft_ms or 2000) / 1000
    nc = await fab.connect(fabric, "soak-watch")
    watch = await fab.NodeWatch.attach(nc)
    await watch.wait_nodes(fab.Layout().expected_nodes(), timeout=120)
    scale = args.capacity_scale
    if scale is None:
        say(f"ramp: {args.ramp} x the spec's rate, {args.step:g}s a step")
        rate, steps = await ramp(fabric.base_url, SPEC, [float(x) for x in args.ramp.split(",")], args.step, slo_ttft_s=slo, say=say)
        held = [s for s in steps if s.offered_per_s <= (rate or 0)]
        scale = held[-1].scale if held else float(args.ramp.split(",")[0])
    load_scale = args.load * scale
    say(f"capacity: x{scale:g} the spec's rate; soaking at {args.load:.0%} of it (x{load_scale:g}) for {args.minutes:g} min, sampling every {args.interval:g}s")
    samples = Samples(time.time())
    load = asyncio.create_task(phase(fabric.base_url, SPEC, load_scale, args.minutes * 60, slo_ttft_s=slo, grace=120, label="soak"))
    while not load.done():
        await sample(fabric, samples, watch)
        rss = sum(v[-1][1] for (m, _), v in samples.series.items() if m == "rss_mib")
        say(f"  {(time.time() - samples.t0) / 60:5.1f} min: RSS total {rss:.0f} MiB")
        await asyncio.wait({load}, timeout=args.interval)
    result = load.result()
    await nc.close()
    return samples, result.as_dict(), load_scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between samples (10-30)")
    parser.add_argument("--load", type=float, default=0.7, help="share of capacity")
    parser.add_argument("--capacity-scale", type=float, default=None, help="skip the ramp: capacity as a multiple of the spec's rate")
    parser.add_argument("--ramp", default="2,4,6,8,10,12", help="multiples of the spec's rate to try")
    parser.add_argument("--step", type=float, default=40.0, help="seconds per ramp step")
    parser.add_argument("--warm-up-share", type=float, default=0.2, help="leading share of the samples left out of the slope")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--judge", type=Path, default=None, metavar="SOAK_JSON", help="judge a saved run again (its samples) instead of running one")
    args = parser.parse_args()

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    if args.judge is not None:
        saved = json.loads(args.judge.read_text())
        samples = Samples(0.0, {tuple(key.split("|", 1)): [tuple(p) for p in pts] for key, pts in saved["series"].items()}, saved["restarts"])  # type: ignore[misc]
        samples.series = {k: v for k, v in samples.series.items() if k[0] != "rss_less_cache_mib"}
        for (metric, who) in [k for k in samples.series if k[0] == "rss_with_cache_mib"]:
            samples.series[("rss_mib", who)] = samples.series.pop((metric, who))
        args.minutes = saved["minutes"]
        return report(samples, saved["load"], saved["scale"], args, write=False)
    with tempfile.TemporaryDirectory(prefix="tierflow-soak-") as tmp:
        say("starting tierflow up (NATS cluster of 3, 2 routers) ...")
        fabric = fab.start(Path(tmp), fab.Layout())
        try:
            samples, load, scale = asyncio.run(soak(fabric, args, say))
        finally:
            fabric.stop(timeout=30)
    return report(samples, load, scale, args, write=True)


def report(samples: Samples, load: dict, scale: float, args: argparse.Namespace, *, write: bool) -> int:
    """Judge and print the samples; with `write`, the JSON and the plot too. Exit status."""
    per_block = cache_bytes_per_block()
    subtract_cache(samples, per_block)
    verdicts = judge(samples, args.warm_up_share)
    print()
    print(f"{'metric':<18} {'process / NATS client':<44} {'first':>8} {'last':>8} {'min':>8} {'max':>8} {'slope/h':>9} {'rise':>7} {'tol':>6} {'t':>6}  flat")
    for v in verdicts:
        print(f"{v.metric:<18} {v.who[:44]:<44} {v.first:>8.1f} {v.last:>8.1f} {v.low:>8.1f} {v.high:>8.1f} {v.slope_per_h:>9.2f} {v.rise:>7.2f} "
              f"{v.tolerance:>6.1f} {min(v.t_stat, 999):>6.1f}  {'yes' if v.flat else 'NO'}")  # fmt: skip
    blocks = {who: pts for (m, who), pts in samples.series.items() if m == "prefix_blocks"}
    if blocks:
        print("prefix-cache blocks per node (not judged): " + ", ".join(f"{who} {pts[0][1]:.0f} -> {pts[-1][1]:.0f}" for who, pts in sorted(blocks.items())))
        raw = {who: pts for (m, who), pts in samples.series.items() if m == "rss_with_cache_mib"}
        print(f"nodes' raw RSS in MiB (not judged; one cached block costs {per_block:.0f} B of host memory): "
              + ", ".join(f"{who} {pts[0][1]:.1f} -> {pts[-1][1]:.1f}" for who, pts in sorted(raw.items())))  # fmt: skip
    restarted = {k: n for k, n in samples.restarts.items() if n}
    print()
    print(f"load: x{scale:g} the spec's rate, {load['sent']} calls, {load['ok']} ok, {load['failed']} failed, {load['refused']} refused, "
          f"{load['cut_off']} cut off; TTFT p95 {load['ttft_p95_s']}s")  # fmt: skip
    print(f"processes restarted during the soak: {restarted or 'none'}")
    not_flat = [f"{v.metric} of {v.who}" for v in verdicts if not v.flat]
    print("verdict: " + ("every series is flat" if not not_flat else f"NOT FLAT: {', '.join(not_flat)}"))
    ok = not not_flat and not restarted and load["failed"] == 0
    title = f"soak: {args.minutes:g} min at {args.load:.0%} of capacity (x{scale:g} loadtest/specs/faults.yaml)"
    if not write:  # a saved run judged again: its plot redrawn beside its JSON
        plot(samples, args.judge.with_suffix(".png"), title)
        print(f"wrote {args.judge.with_suffix('.png')}")
        return 0 if ok else 1
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = args.out / f"soak-{stamp}.png"
    plot(samples, png, title)
    data = {"minutes": args.minutes, "scale": scale, "load": load, "restarts": samples.restarts,
            "series": {f"{m}|{w}": pts for (m, w), pts in samples.series.items()},
            "bytes_per_cached_block": per_block, "verdicts": [{**v.__dict__, "flat": v.flat} for v in verdicts]}  # fmt: skip
    (args.out / f"soak-{stamp}.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {png} and {png.with_suffix('.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
