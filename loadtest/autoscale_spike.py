"""The autoscaler on the live fabric: steady load, a 5x spike, back to baseline.

Starts `tierflow up` with one decode node of a deployment allowed 1..--max-replicas
nodes (a 405B bundle, so a few requests per second fill a node) and the autoscaler on
the local actuator, then drives it with open-loop Poisson arrivals through the official
OpenAI client (streaming, so client-side TTFT is measured):

    steady (--steady s at --rate/s) -> spike (--spike s at --factor x rate) -> baseline (--after s)

Every request is recorded (start, TTFT, end, ok/error, node); replicas are sampled every
second from the supervisor (node processes running: what costs) and the heartbeats
(ready nodes: what serves). Prints and writes loadtest/out/autoscale_<ts>.json (and a
PNG timeline when matplotlib is installed):

- scale-up reaction: spike start -> first scale-up decision, and -> the new node ready
- share of 10-second windows whose client TTFT p95 is inside the SLO (and had no error)
- node-seconds used against a fleet provisioned statically for the peak
- time to scale back down: spike end -> as many nodes as before the spike
- requests lost (failed) or hung (timed out): must be 0

    .venv/bin/python loadtest/autoscale_spike.py [--rate 1 --factor 5 --steady 45 --spike 60 --after 90]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats
import numpy as np
import openai

from tierflow.contracts import messages, subjects
from tierflow.harness import Fabric, start_fabric

HERE = Path(__file__).resolve().parent
MODEL = "llama-3.1-405b"
DEPLOYMENT = "elastic"
FLEET = """
models:
  - name: {model}
    versions: [{{version: v1, catalog: {model}}}]
bundles:
  - name: big
    models: [{{model: {model}, config: ss8192-bs4}}]
deployments:
  - name: {deployment}
    bundle: big
    replicas: 1
    min_replicas: 1
    max_replicas: {max_replicas}
    profile: sn40l-16
"""
WINDOW = 10.0  # seconds per SLO window


@dataclass
class Request:
    start: float  # seconds since the load began
    phase: str
    ttft: float | None = None
    end: float | None = None
    ok: bool = False
    error: str = ""
    hung: bool = False
    node: str = ""
    tokens: int = 0


@dataclass
class Sample:
    t: float
    provisioned: int  # node processes running (the supervisor's list)
    ready: int  # nodes heartbeating, not cordoned
    draining: int  # nodes heartbeating, cordoned or draining
    in_flight: int  # client requests open


@dataclass
class Probe:
    """Decisions and heartbeats off NATS; replicas sampled once a second."""

    t0: float = 0.0
    decisions: list[dict] = field(default_factory=list)
    beats: dict[str, tuple[float, bool]] = field(default_factory=dict)  # node -> (monotonic, leaving)
    first_seen: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    async def attach(self, nc: nats.NATS) -> None:
        async def on_decision(msg) -> None:
            d = messages.decision_decoder.decode(msg.data)
            if d.deployment == DEPLOYMENT:
                self.decisions.append({"t": time.monotonic() - self.t0, "action": d.action, "current": d.current_replicas,
                                       "desired": d.desired_replicas, "signal": d.signal, "reason": d.reason, "victims": d.victims})

        async def on_beat(msg) -> None:
            hb = messages.heartbeat_decoder.decode(msg.data)
            if hb.deployment == DEPLOYMENT and hb.role == "decode":
                now = time.monotonic()
                self.beats[hb.node_id] = (now, hb.cordoned or hb.draining)
                if not (hb.cordoned or hb.draining):
                    self.first_seen.setdefault(hb.node_id, now - self.t0)

        await nc.subscribe(subjects.AUTOSCALER_DECISIONS, cb=on_decision)
        await nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_beat)

    async def sample(self, nc: nats.NATS, in_flight: int) -> None:
        try:
            msg = await nc.request(subjects.SUPERVISOR_CONTROL, messages.encoder.encode(messages.SupervisorCommand(action="list")), timeout=2)
            provisioned = sum(1 for n in messages.supervisor_reply_decoder.decode(msg.data).nodes if n.deployment == DEPLOYMENT and n.role == "decode")
        except Exception:
            provisioned = self.samples[-1].provisioned if self.samples else 0
        now = time.monotonic()
        live = [leaving for seen, leaving in self.beats.values() if now - seen <= 3.0]
        self.samples.append(Sample(now - self.t0, provisioned, live.count(False), live.count(True), in_flight))


async def one_request(client: openai.AsyncOpenAI, record: Request, prompt: str, max_tokens: int, t0: float) -> None:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        record.node = raw.headers.get("x-tierflow-node", "")
        async for chunk in raw.parse():
            if record.ttft is None and chunk.choices and chunk.choices[0].delta.content:
                record.ttft = time.monotonic() - t0 - record.start
            if chunk.usage:
                record.tokens = chunk.usage.completion_tokens
        record.ok = record.tokens == max_tokens
        if not record.ok:
            record.error = f"incomplete: {record.tokens} of {max_tokens} tokens"
    except openai.APITimeoutError:
        record.hung, record.error = True, "timed out"
    except Exception as exc:  # every failure is reported in the summary
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        record.end = time.monotonic() - t0 - record.start


async def drive(args: argparse.Namespace, fabric: Fabric) -> tuple[list[Request], Probe, list[tuple[str, float, float, float]]]:
    phases = [("steady", 0.0, args.steady, args.rate), ("spike", args.steady, args.steady + args.spike, args.rate * args.factor),
              ("baseline", args.steady + args.spike, args.steady + args.spike + args.after, args.rate)]  # fmt: skip
    rng = random.Random(args.seed)
    client = openai.AsyncOpenAI(base_url=fabric.base_url, api_key="unused", max_retries=0, timeout=args.request_timeout)
    nc = await nats.connect(fabric.nats_urls, **fabric.nats_options())
    probe = Probe()
    await probe.attach(nc)
    requests: list[Request] = []
    tasks: set[asyncio.Task[None]] = set()
    t0 = probe.t0 = time.monotonic()
    end = phases[-1][2]

    async def sampler() -> None:
        while True:
            await probe.sample(nc, len(tasks))
            await asyncio.sleep(1.0)

    sampling = asyncio.create_task(sampler())
    t = 0.0
    for name, start, stop, rate in phases:
        t = max(t, start)
        while len(requests) < args.max_requests:
            t += rng.expovariate(rate)
            if t >= stop:
                t = stop
                break
            delay = t0 + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(tasks) >= args.max_in_flight:  # a safety bound, never reached at sane rates
                await asyncio.sleep(0.01)
            record = Request(start=time.monotonic() - t0, phase=name)
            requests.append(record)
            prompt = f"[{len(requests)}] " + "Summarize the quarterly report. " * args.prompt_words
            task = asyncio.create_task(one_request(client, record, prompt, args.max_tokens, t0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    remaining = t0 + end - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)
    if tasks:
        await asyncio.wait(tasks, timeout=args.request_timeout + 5)
    for task in tasks:  # only a hung request can still be open here
        task.cancel()
    sampling.cancel()
    await client.close()
    await nc.drain()
    return requests, probe, [(n, a, b, r) for n, a, b, r in phases]


def summarize(args: argparse.Namespace, requests: list[Request], probe: Probe, phases: list[tuple[str, float, float, float]]) -> dict:
    spike_start, spike_end, end = phases[1][1], phases[1][2], phases[2][2]
    samples = [s for s in probe.samples if s.t <= end]
    before = max((s.provisioned for s in samples if s.t < spike_start), default=1) or 1
    ups = [d for d in probe.decisions if d["action"] == "up" and d["t"] >= spike_start]
    new_nodes = sorted(t for node, t in probe.first_seen.items() if t >= spike_start)
    back = next((s.t for s in samples if s.t >= spike_end and s.provisioned <= before
                 and all(x.provisioned <= before for x in samples if x.t >= s.t)), None)  # fmt: skip
    peak = max((s.provisioned for s in samples), default=0)
    node_seconds = sum(s.provisioned for s in samples)  # one sample per second
    windows = []
    for k in range(math.ceil(end / WINDOW)):
        lo, hi = k * WINDOW, (k + 1) * WINDOW
        inside = [r for r in requests if lo <= r.start < hi]
        ttfts = [r.ttft for r in inside if r.ttft is not None]
        if not inside:
            continue
        p95 = float(np.percentile(ttfts, 95)) if ttfts else None
        windows.append({"start": lo, "requests": len(inside), "ttft_p95": p95,
                        "ok": p95 is not None and p95 <= args.ttft_slo and all(r.ok for r in inside)})  # fmt: skip
    failed = [r for r in requests if not r.ok and not r.hung]
    hung = [r for r in requests if r.hung]

    def p95_of(phase: str) -> float | None:
        values = [r.ttft for r in requests if r.phase == phase and r.ttft is not None]
        return round(float(np.percentile(values, 95)), 3) if values else None

    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "requests": {"total": len(requests), "ok": sum(r.ok for r in requests), "failed": len(failed), "hung": len(hung),
                     "lost": len(failed) + len(hung), "errors": sorted({r.error for r in failed + hung})[:10]},
        "ttft_p95_by_phase": {name: p95_of(name) for name, *_ in phases},
        "scale_up_decision_s": round(ups[0]["t"] - spike_start, 2) if ups else None,
        "scale_up_ready_s": round(new_nodes[0] - spike_start, 2) if new_nodes else None,
        "slo_windows_inside": round(sum(w["ok"] for w in windows) / len(windows), 3) if windows else None,
        "slo_windows": f"{sum(w['ok'] for w in windows)}/{len(windows)}",
        "node_seconds": node_seconds,
        "static_peak_node_seconds": peak * len(samples),
        "node_seconds_ratio": round(node_seconds / (peak * len(samples)), 3) if peak and samples else None,
        "peak_replicas": peak,
        "replicas_before_spike": before,
        "scale_down_s": round(back - spike_end, 2) if back is not None else None,
        "phases": [{"name": n, "start": a, "end": b, "rate": r} for n, a, b, r in phases],
        "windows": windows,
        "timeline": [asdict(s) for s in samples],
        "decisions": [d for d in probe.decisions if d["action"] != "hold"],
        "request_log": [asdict(r) for r in requests],
    }


def plot(summary: dict, path: Path) -> bool:
    """The timeline as a PNG; False when matplotlib is not installed (the JSON has it all)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timeline, reqs = summary["timeline"], summary["request_log"]
    end = summary["phases"][-1]["end"]
    fig, (ax_load, ax_rep, ax_ttft) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    starts = np.array([r["start"] for r in reqs])
    bins = np.arange(0, end + 1, 1.0)
    ax_load.plot(bins[:-1], np.histogram(starts, bins)[0], lw=0.8, label="requests started / s")
    ax_load.plot([s["t"] for s in timeline], [s["in_flight"] for s in timeline], lw=0.8, label="in flight")
    ax_load.set_ylabel("load")
    ax_load.legend(loc="upper right")
    ax_rep.step([s["t"] for s in timeline], [s["provisioned"] for s in timeline], where="post", label="node processes")
    ax_rep.step([s["t"] for s in timeline], [s["ready"] for s in timeline], where="post", label="ready (heartbeat)")
    ax_rep.step([s["t"] for s in timeline], [s["draining"] for s in timeline], where="post", label="draining", ls=":")
    ax_rep.set_ylabel("replicas")
    ax_rep.legend(loc="upper right")
    ok = [(r["start"], r["ttft"]) for r in reqs if r["ttft"] is not None]
    ax_ttft.scatter([a for a, _ in ok], [b for _, b in ok], s=2, alpha=0.3, label="request TTFT")
    ax_ttft.step([w["start"] for w in summary["windows"]], [w["ttft_p95"] or 0 for w in summary["windows"]], where="post", color="k", label="p95 per 10 s")
    ax_ttft.axhline(summary["config"]["ttft_slo"], color="r", ls="--", label="SLO")
    ax_ttft.set_ylabel("TTFT (s)")
    ax_ttft.set_xlabel("seconds since load began")
    ax_ttft.legend(loc="upper right")
    for ax in (ax_load, ax_rep, ax_ttft):
        for phase in summary["phases"]:
            if phase["name"] == "spike":
                ax.axvspan(phase["start"], phase["end"], color="orange", alpha=0.12)
    fig.suptitle(f"autoscaling through a {summary['config']['factor']:g}x spike")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1.0, help="baseline requests per second")
    parser.add_argument("--factor", type=float, default=5.0, help="spike = factor x baseline")
    parser.add_argument("--steady", type=float, default=45.0, help="seconds of baseline before the spike")
    parser.add_argument("--spike", type=float, default=60.0, help="seconds of spike")
    parser.add_argument("--after", type=float, default=90.0, help="seconds of baseline after the spike")
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--ttft-slo", type=float, default=1.0, help="p95 TTFT SLO, seconds (the autoscaler's and the report's)")
    parser.add_argument("--interval", type=float, default=1.0, help="autoscaler tick")
    parser.add_argument("--panic-window", type=float, default=2.0)
    parser.add_argument("--stable-window", type=float, default=30.0)
    parser.add_argument("--cooldown-down", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=150, help="repetitions of a 6-token sentence in each prompt")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="a request open longer is counted as hung")
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    env = {
        "TIERFLOW_INTERVAL": str(args.interval), "TIERFLOW_PANIC_WINDOW": str(args.panic_window),
        "TIERFLOW_STABLE_WINDOW": str(args.stable_window), "TIERFLOW_COOLDOWN_UP": "2",
        "TIERFLOW_COOLDOWN_DOWN": str(args.cooldown_down), "TIERFLOW_TTFT_SLO": str(args.ttft_slo),
        "TIERFLOW_MAX_SIGNAL_AGE": "5",
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="tierflow-autoscale-") as tmp:
        data = Path(tmp)
        fleet = data / "fleet.yaml"
        fleet.write_text(FLEET.format(model=MODEL, deployment=DEPLOYMENT, max_replicas=args.max_replicas))
        print(f"starting tierflow up (1 decode node, {DEPLOYMENT} 1..{args.max_replicas} replicas) ...", flush=True)
        fabric = start_fabric(data, "--fleet", str(fleet), "--deployment", DEPLOYMENT, "--decode-nodes", "1", "--prefill-nodes", "0", env=env)
        try:
            print(f"{fabric.ready_line}\nload: {args.rate:g}/s for {args.steady:g}s, {args.rate * args.factor:g}/s for {args.spike:g}s, "
                  f"{args.rate:g}/s for {args.after:g}s", flush=True)  # fmt: skip
            requests, probe, phases = asyncio.run(drive(args, fabric))
        finally:
            fabric.stop()
            autoscaler_log = fabric.log("autoscaler")
    summary = summarize(args, requests, probe, phases)
    summary["autoscaler_log_tail"] = [line for line in autoscaler_log.splitlines() if '"scale ' in line or "removed" in line or "started" in line][-30:]
    json_path = args.out / f"autoscale_{stamp}.json"
    json_path.write_text(json.dumps(summary, indent=1))
    png_path = args.out / f"autoscale_{stamp}.png"
    drew = plot(summary, png_path)

    r = summary["requests"]
    print()
    print(f"requests: {r['total']} sent, {r['ok']} ok, {r['failed']} failed, {r['hung']} hung  -> lost {r['lost']}")
    print(f"TTFT p95 by phase (s): {summary['ttft_p95_by_phase']}  (SLO {args.ttft_slo:g}s)")
    print(f"scale-up reaction: decision {summary['scale_up_decision_s']}s, new node ready {summary['scale_up_ready_s']}s after the spike began")
    print(f"10-s windows inside the SLO: {summary['slo_windows']} ({summary['slo_windows_inside']})")
    print(f"node-seconds: {summary['node_seconds']} vs {summary['static_peak_node_seconds']} for a static fleet of "
          f"{summary['peak_replicas']} (ratio {summary['node_seconds_ratio']})")  # fmt: skip
    print(f"scale back down to {summary['replicas_before_spike']} node(s): {summary['scale_down_s']}s after the spike ended")
    print(f"wrote {json_path}" + (f" and {png_path}" if drew else " (no PNG: pip install matplotlib)"))
    return 0 if r["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
