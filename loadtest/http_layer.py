"""Why the router has its own HTTP layer: tierflow's server against aiohttp, measured.

Run it as ``.venv/bin/python loadtest/http_layer.py``.  It starts two servers as
subprocesses on 127.0.0.1 (both on uvloop, both pinned to one core) answering the same
two endpoints:

* ``/json``: a small precomputed JSON body (the HTTP layer's cost, nothing else);
* ``/stream``: 16 Server-Sent Events yielded back to back.  Ours writes chunks that
  are ready together in one syscall (it flushes when the iterator is about to wait);
  aiohttp writes each one;
* ``/paced``: the same 16 events with a yield to the event loop before each, as when
  tokens arrive one by one from a node: now every event is its own write in both.

Each endpoint is driven with ``wrk -t1 -c64 -d8s --latency`` (wrk pinned to another
core), after a one-second warm-up.  The server's CPU time comes from the utime+stime
delta in ``/proc/<pid>/stat`` over the measured run, divided by the requests wrk
completed.  Everything targets 127.0.0.1 only; the servers are stopped on every exit
path (and die with this process thanks to PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

HOST = "127.0.0.1"
JSON_BODY = b'{"object":"list","data":[{"id":"tier-small","object":"model","owned_by":"tierflow"}]}'
SSE_EVENTS = tuple(
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    b'{"content":"tok%02d"}}]}\n\n' % i
    for i in range(15)
) + (b"data: [DONE]\n\n",)
SERVERS = ("tierflow", "aiohttp")
ENDPOINTS = ("/json", "/stream", "/paced")


# ------------------------------------------------------------------ the two servers
async def _run_tierflow(port: int) -> None:
    from tierflow.services.router.http_server import (
        Request,
        Response,
        StreamingResponse,
        serve,
    )

    json_response = Response(200, JSON_BODY)
    not_found = Response(404, b'{"error":"not found"}')

    async def events(paced: bool) -> AsyncIterator[bytes]:
        for event in SSE_EVENTS:
            if paced:
                await asyncio.sleep(0)
            yield event

    async def handler(request: Request) -> Response | StreamingResponse:
        if request.path == "/json":
            return json_response
        if request.path in ("/stream", "/paced"):
            return StreamingResponse(200, events(request.path == "/paced"))
        return not_found

    await serve(handler, HOST, port)
    await asyncio.Event().wait()


async def _run_aiohttp(port: int) -> None:
    import logging

    from aiohttp import web

    # wrk drops its connections mid-stream when a run ends, and aiohttp logs a traceback
    # for each; wrk's own error counters already report real failures.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    async def json_handler(request: web.Request) -> web.Response:
        return web.Response(body=JSON_BODY, content_type="application/json")

    async def stream_handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        paced = request.path == "/paced"
        for event in SSE_EVENTS:
            if paced:
                await asyncio.sleep(0)
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/json", json_handler)
    app.router.add_get("/stream", stream_handler)
    app.router.add_get("/paced", stream_handler)
    runner = web.AppRunner(app, access_log=None)  # no access log: compare HTTP layers
    await runner.setup()
    await web.TCPSite(runner, HOST, port, backlog=2048).start()
    await asyncio.Event().wait()


def _serve_main(kind: str, port: int) -> None:
    """Child process entry point."""
    import uvloop

    runner: Callable[[int], object] = _run_tierflow if kind == "tierflow" else _run_aiohttp
    try:
        uvloop.run(runner(port))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------- the harness
@dataclass
class Result:
    server: str
    endpoint: str
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    user_share: float  # of that CPU, the part spent in user space (Python, parser)
    errors: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent_and_pin(cpu: int | None) -> Callable[[], None]:
    def preexec() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return preexec


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, from /proc/<pid>/stat (fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start within {timeout}s")


def _check_endpoints(port: int) -> None:
    """Both servers must answer the same thing, or the comparison means nothing."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/json")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == JSON_BODY, "bad /json"
        for path in ("/stream", "/paced"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.getheader("Transfer-Encoding") == "chunked", f"{path} not chunked"
            assert response.read() == b"".join(SSE_EVENTS), f"bad {path}"
    finally:
        conn.close()


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _parse_wrk(output: str) -> tuple[int, float, float, float, int]:
    """(requests, requests/s, p50 ms, p99 ms, errors) from ``wrk --latency`` output."""

    def latency(pct: str) -> float:
        match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        if match is None:
            raise ValueError(f"no {pct}% latency in wrk output:\n{output}")
        return float(match.group(1)) * _UNITS_MS[match.group(2)]

    requests = re.search(r"(\d+) requests in", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if requests is None or rps is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors += int(non2xx.group(1)) if non2xx else 0
    return int(requests.group(1)), float(rps.group(1)), latency("50"), latency("99"), errors


def _wrk(
    url: str, duration: int, connections: int, cpu: int | None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
        preexec_fn=_die_with_parent_and_pin(cpu),
    )


def _bench(
    server: str, pid: int, port: int, endpoint: str, args: argparse.Namespace, cpu: int | None
) -> Result:
    url = f"http://{HOST}:{port}{endpoint}"
    _wrk(url, 1, args.connections, cpu)  # warm-up: connections, caches, allocator
    user_before, system_before = _cpu_seconds(pid)
    output = _wrk(url, args.duration, args.connections, cpu).stdout
    user_after, system_after = _cpu_seconds(pid)
    user, system = user_after - user_before, system_after - system_before
    requests, rps, p50, p99, errors = _parse_wrk(output)
    per_request = (user + system) / requests * 1e6
    return Result(server, endpoint, requests, rps, p50, p99, per_request,
                  user / max(user + system, 1e-9), errors)


def _print_table(results: list[Result]) -> None:
    print()
    print(f"{'server':<9} {'endpoint':<8} {'req/s':>10} {'p50':>9} {'p99':>9} "
          f"{'CPU µs/req':>11} {'user%':>6} {'errors':>7}")
    for r in results:
        print(f"{r.server:<9} {r.endpoint:<8} {r.rps:>10,.0f} {r.p50_ms:>7.2f}ms "
              f"{r.p99_ms:>7.2f}ms {r.cpu_us_per_request:>11.1f} {r.user_share:>6.0%} "
              f"{r.errors:>7}")
    print()
    by_key = {(r.server, r.endpoint): r for r in results}
    for endpoint in ENDPOINTS:
        ours, base = by_key[("tierflow", endpoint)], by_key[("aiohttp", endpoint)]
        print(f"ours/aiohttp {endpoint:<8} throughput x{ours.rps / base.rps:.2f}, "
              f"CPU per request x{ours.cpu_us_per_request / base.cpu_us_per_request:.2f}, "
              f"p99 x{ours.p99_ms / base.p99_ms:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve_main(args.serve, args.port)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found (Debian: apt-get install wrk)")

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, wrk_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    print(f"CPUs {cpus}: server on {server_cpu}, wrk on {wrk_cpu}; "
          f"wrk -t1 -c{args.connections} -d{args.duration}s per endpoint")
    results: list[Result] = []
    for server in SERVERS:
        port = _free_port()
        process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", server, "--port", str(port)],
            preexec_fn=_die_with_parent_and_pin(server_cpu),
        )
        try:
            _wait_listening(port, process)
            _check_endpoints(port)
            for endpoint in ENDPOINTS:
                result = _bench(server, process.pid, port, endpoint, args, wrk_cpu)
                print(f"  {server} {endpoint}: {result.rps:,.0f} req/s", flush=True)
                results.append(result)
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    _print_table(results)


if __name__ == "__main__":
    main()
