"""What the router adds to a request, measured against calling the node directly.

One decode node on the `zero` hardware profile (no compute, no transfer time), so what
remains of a request's latency is the fabric's own work. In one run, with the same
client process and alternating in rounds (so machine noise hits both alike):

  direct  the client speaks NATS to the node itself (GenerateRequest -> token stream)
  router  the client speaks HTTP to the router (POST /v1/completions), which does the same

and prints p50/p99 of each and of the difference, plus the ratio. Then `wrk` (a C load
generator, if installed) drives the router with concurrent keep-alive connections and
prints its throughput on this machine.

    .venv/bin/python loadtest/router_overhead.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import nats
import numpy as np

from tierflow.contracts import messages, subjects
from tierflow.harness import start_fabric
from tierflow.runtime import nats_auth
from tierflow.tokenizer import encode

HERE = Path(__file__).resolve().parent
PROMPT = "Benchmark the fabric's own overhead, please."
BODY = json.dumps({"model": "llama-3.1-8b", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}).encode()


async def direct_once(nc: nats.NATS, stream_id: str, queue: asyncio.Queue, ids: list[int]) -> float:
    request_id = uuid.uuid4().hex
    req = messages.GenerateRequest(request_id=request_id, model="llama-3.1-8b", prompt_token_ids=ids, max_tokens=4, ignore_eos=True)
    started = time.perf_counter()
    await nc.publish(subjects.node_generate("decode-0"), messages.encoder.encode(req), reply=subjects.router_stream(stream_id, request_id))
    while True:
        msg = await queue.get()
        if type(messages.stream_decoder.decode(msg.data)) is messages.Finished:
            return time.perf_counter() - started


async def http_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> float:
    started = time.perf_counter()
    writer.write(head + BODY)
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    assert status.startswith(b"HTTP/1.1 200"), status
    return time.perf_counter() - started


async def measure(fabric, n: int) -> tuple[np.ndarray, np.ndarray]:
    nc = await nats.connect(fabric.nats_urls, **fabric.nats_options())
    queue: asyncio.Queue = asyncio.Queue()
    inbox = nats_auth.ADMIN_STREAM_ID  # a node answers the admin's probes on its own reply streams, as a router's
    await nc.subscribe(subjects.router_streams(inbox), cb=queue.put)
    reader, writer = await asyncio.open_connection(fabric.host, fabric.http_port)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode()
    ids = encode(PROMPT)
    for _ in range(50):  # warm both paths
        await direct_once(nc, inbox, queue, ids)
        await http_once(reader, writer, head)
    direct, routed = [], []
    for i in range(n):
        if i % 2:
            direct.append(await direct_once(nc, inbox, queue, ids))
            routed.append(await http_once(reader, writer, head))
        else:
            routed.append(await http_once(reader, writer, head))
            direct.append(await direct_once(nc, inbox, queue, ids))
    writer.close()
    await nc.close()
    return np.array(direct), np.array(routed)


def wrk_throughput(fabric, seconds: int = 8, connections: int = 32) -> str:
    if shutil.which("wrk") is None:
        return "wrk not installed (apt-get install wrk): throughput not measured"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(BODY.decode())}\n')
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, f"http://{fabric.host}:{fabric.http_port}/v1/completions"],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    keep = [line.strip() for line in out.splitlines() if line.strip().startswith(("Requests/sec", "50%", "99%", "Non-2xx"))]
    return "; ".join(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fabric = start_fabric(Path(tmp), "--fleet", str(HERE / "fleets/zero.yaml"), "--deployment", "zero", "--decode-nodes", "1", "--prefill-nodes", "0")
        try:
            direct, routed = asyncio.run(measure(fabric, args.requests))
            added = routed - direct
            ms = lambda a, q: f"{np.percentile(a, q) * 1e3:7.3f} ms"  # noqa: E731
            print(f"router overhead on the zero profile, {args.requests} sequential requests each way (4 tokens)")
            print(f"  direct (NATS to node)  p50 {ms(direct, 50)}  p99 {ms(direct, 99)}")
            print(f"  via router (HTTP)      p50 {ms(routed, 50)}  p99 {ms(routed, 99)}")
            print(f"  added by the router    p50 {ms(added, 50)}  p99 {ms(added, 99)}")
            print(f"  ratio router/direct    p50 {np.percentile(routed, 50) / np.percentile(direct, 50):.2f}x")
            print(f"  wrk -c32 on the router: {wrk_throughput(fabric)}")
        finally:
            fabric.stop()


if __name__ == "__main__":
    main()
