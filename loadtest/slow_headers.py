"""Slow headers (slowloris) against the router: 1,000 sockets trickling a header byte a
second while a normal client measures its latency, in one run.

    .venv/bin/python loadtest/slow_headers.py                  # 1,000 sockets, 10 s deadline
    .venv/bin/python loadtest/slow_headers.py --sockets 3000 --header-timeout 5

It starts its own fabric (`tierflow up`, one decode node) with the router's header
deadline set by `--header-timeout`, measures the normal client alone (chat completions
of one token, `--concurrency` at a time, keep-alive) for `--baseline` seconds, then opens
the slow sockets (in a process of their own, spread over 127.0.0.10-19, as ten clients,
so the per-address cap is not what closes them) and measures the normal client again while they trickle, sampling the
router's open file descriptors (/proc/PID/fd) all along. It prints:

- slow sockets answered 408 and closed, and the latest close after its connect,
  against the deadline: every one must close within the deadline (+1 s of slack for
  this client's own scheduling);
- the normal client's p50/p99 before and during, and their ratio (during / before):
  p99 must stay within 2x (or 20 ms) of before;
- the router's fds before, at peak and after: the peak may not exceed before + sockets
  + 64, and after must return within 64 of before.

Exit status 1 when a must fails. `tests/security/test_slow_headers.py` runs a short form
(200 sockets, a 2 s deadline) with the same parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

__all__ = ["SlowResult", "FdSampler", "fd_count", "raise_fd_limit", "slow_sockets", "normal_latencies", "percentile"]


@dataclass(slots=True)
class SlowResult:
    """One slow socket: what it was answered and when (seconds after its connect)."""

    status: int | None = None  # the status line's code, None if closed without one
    answered: float | None = None
    closed: float | None = None
    bytes_sent: int = 0
    error: str = ""


def raise_fd_limit() -> None:
    """The soft limit on open files up to the hard one (a default soft 1,024 is too few)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc/PID/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    """Open file descriptors of a process (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class FdSampler:
    """Samples a process's fd count every `period` seconds until stopped."""

    pid: int
    period: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.samples.append((time.monotonic(), fd_count(self.pid)))
            except FileNotFoundError:
                return
            try:
                await asyncio.wait_for(stop.wait(), self.period)
            except TimeoutError:
                pass

    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)


async def _slow_one(host: str, port: int, source: str, trickle_s: float, give_up_s: float) -> SlowResult:
    result = SlowResult()
    began = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    except OSError as exc:
        result.error = f"connect: {exc}"
        return result

    async def trickle() -> None:
        head = b"GET /v1/models HTTP/1.1\r\nHost: slow\r\nX-Slow: "
        writer.write(head)
        result.bytes_sent = len(head)
        while not writer.is_closing():
            await asyncio.sleep(trickle_s)
            try:
                writer.write(b"a")
                result.bytes_sent += 1
            except (ConnectionError, RuntimeError):
                return

    sender = asyncio.create_task(trickle())
    try:
        first = await asyncio.wait_for(reader.readuntil(b"\r\n"), give_up_s)
        result.answered = time.monotonic() - began
        parts = first.split()
        result.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        while await asyncio.wait_for(reader.read(65536), give_up_s):
            pass
        result.closed = time.monotonic() - began
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        result.closed = time.monotonic() - began
        result.error = type(exc).__name__
    except TimeoutError:
        result.error = f"still open after {give_up_s:g} s"
    finally:
        sender.cancel()
        writer.close()
    return result


async def slow_sockets(host: str, port: int, n: int, *, sources: list[str], trickle_s: float = 1.0, give_up_s: float = 120.0,
                       ramp_s: float = 0.5) -> list[SlowResult]:
    """Open `n` sockets (spread over `sources`, within `ramp_s`) that each send a request
    line and then one header byte every `trickle_s` until the server closes them."""

    async def delayed(i: int) -> SlowResult:
        await asyncio.sleep(ramp_s * i / max(1, n))
        return await _slow_one(host, port, sources[i % len(sources)], trickle_s, give_up_s)

    return list(await asyncio.gather(*(delayed(i) for i in range(n))))


async def normal_latencies(base_url: str, model: str, seconds: float, concurrency: int) -> list[float]:
    """Chat completions of one token, `concurrency` at a time, for `seconds`: each latency."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="normal", max_retries=0, timeout=30)
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < end:
            began = time.monotonic()
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"normal {w} {i}"}], max_tokens=1)
            latencies.append(time.monotonic() - began)
            i += 1

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await client.close()
    return latencies


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(args: argparse.Namespace) -> int:
    from tierflow.harness import start_fabric

    raise_fd_limit()  # this process's sockets, and the router's (it inherits the limit)

    data = Path(tempfile.mkdtemp(prefix="slow-headers-"))
    env = {"TIERFLOW_HEADER_TIMEOUT": str(args.header_timeout)}
    fabric = start_fabric(data, "--decode-nodes", "1", "--prefill-nodes", "0", "--actuator", "none", cwd=REPO, env=env)
    try:
        router = next(c for c in fabric.children() if c.role == "router")
        fds_before = fd_count(router.pid)
        await normal_latencies(fabric.base_url, args.model, 1.0, args.concurrency)  # warm up
        cpu0, t0 = cpu_seconds(router.pid), time.monotonic()
        baseline = await normal_latencies(fabric.base_url, args.model, args.baseline, args.concurrency)
        cpu_before = (cpu_seconds(router.pid) - cpu0) / (time.monotonic() - t0)
        stop = asyncio.Event()
        sampler = FdSampler(router.pid)
        sampling = asyncio.create_task(sampler.run(stop))
        # The slow sockets live in a process of their own, so their 1,000 wake-ups a second
        # do not delay the normal client's event loop: only the router is shared.
        worker = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--slow-worker", fabric.host, str(fabric.http_port), str(args.sockets),
            str(args.header_timeout * 4 + 10), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(min(1.5, args.header_timeout / 2))  # the slow sockets are all open
        cpu0, worker0, t0 = cpu_seconds(router.pid), cpu_seconds(worker.pid), time.monotonic()
        during = await normal_latencies(fabric.base_url, args.model, max(1.0, args.header_timeout - 2.5), args.concurrency)
        elapsed = time.monotonic() - t0
        cpu_during, cpu_worker = (cpu_seconds(router.pid) - cpu0) / elapsed, (cpu_seconds(worker.pid) - worker0) / elapsed
        out, _ = await worker.communicate()
        results = [SlowResult(**r) for r in json.loads(out)]
        await asyncio.sleep(3.0)  # the lingering closes (2 s) finish
        stop.set()
        await sampling
        fds_after = fd_count(router.pid)
    finally:
        fabric.stop()

    answered = sum(1 for r in results if r.status == 408)
    closed = [r.closed for r in results if r.closed is not None]
    latest = max(closed, default=float("nan"))
    errors = [r.error for r in results if r.error and r.closed is None]
    p50_b, p99_b = percentile(baseline, 0.5), percentile(baseline, 0.99)
    p50_d, p99_d = percentile(during, 0.5), percentile(during, 0.99)
    peak = sampler.peak()
    print(f"slow sockets: {args.sockets}, trickling 1 byte/s, header deadline {args.header_timeout:g} s")
    print(f"  answered 408: {answered}   closed: {len(closed)}   latest close after connect: {latest:.2f} s   not closed: {len(errors)} {errors[:3]}")
    print(f"normal client ({args.concurrency} at a time, chat, 1 token): {len(baseline)} before, {len(during)} during")
    print(f"  p50 {p50_b * 1000:.1f} ms -> {p50_d * 1000:.1f} ms  (x{p50_d / p50_b:.2f})")
    print(f"  p99 {p99_b * 1000:.1f} ms -> {p99_d * 1000:.1f} ms  (x{p99_d / p99_b:.2f})   mean {statistics.fmean(baseline) * 1000:.1f} -> {statistics.fmean(during) * 1000:.1f} ms")
    print(f"router fds: before {fds_before}, peak {peak}, after {fds_after}")
    print(f"router CPU: {cpu_before:.0%} of a core before, {cpu_during:.0%} during (the slow sockets' own process: {cpu_worker:.0%}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    musts = {
        "every slow socket closed within the deadline (+1 s)": len(closed) == args.sockets and latest <= args.header_timeout + 1.0,
        "normal p99 within 2x (or +20 ms) of before": p99_d <= max(2 * p99_b, p99_b + 0.020),
        "fds bounded (peak <= before + sockets + 64, after <= before + 64)": peak <= fds_before + args.sockets + 64 and fds_after <= fds_before + 64,
    }
    for must, held in musts.items():
        print(f"  [{'ok' if held else 'FAILED'}] {must}")
    return 0 if all(musts.values()) else 1


def _slow_worker(host: str, port: int, n: int, give_up_s: float) -> None:
    """`--slow-worker`: run the slow sockets here and print their results as JSON."""
    raise_fd_limit()
    sources = [f"127.0.0.{10 + i}" for i in range(10)]
    results = asyncio.run(slow_sockets(host, port, n, sources=sources, give_up_s=give_up_s, ramp_s=1.0))
    print(json.dumps([asdict(r) for r in results]))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--slow-worker":
        _slow_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--baseline", type=float, default=8.0, help="seconds of the normal client alone")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--model", default="llama-3.1-8b")
    args = parser.parse_args()
    sys.exit(asyncio.run(_run(args)))


if __name__ == "__main__":
    main()
