"""`tierflow router --workers N`: N router processes answer on one port, and stop together."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tierflow.runtime.nats_server import free_port


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _listening(port: int) -> set[int]:
    """Pids with a socket listening on 127.0.0.1:`port` (from /proc: no psutil needed)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            pids.add(int(proc.name))
    return pids


async def test_workers_share_the_port_and_stop_together(nats_url: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERFLOW_")} | {"TIERFLOW_ALLOW_ANONYMOUS": "true"}
    parent = subprocess.Popen(
        [sys.executable, "-m", "tierflow", "router", "--nats-url", nats_url, "--http-port", str(port), "--grpc-port", str(free_port()), "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(300):
            if parent.poll() is not None:
                raise AssertionError(f"exited {parent.returncode}: {parent.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            workers = _children(parent.pid)
            if len(workers) == 2 and _listening(port) == set(workers):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"two workers never listened on {port}: children {_children(parent.pid)}, listening {_listening(port)}")
        def health() -> int:
            try:
                return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).status)  # noqa: S310
            except urllib.error.HTTPError as answered:
                return answered.code

        assert await asyncio.to_thread(health) in (200, 503)  # answered (503: no node here), by whichever worker took it
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(parent.wait, 30) == 0
        assert not _listening(port)
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    finally:
        if parent.poll() is None:
            parent.kill()


def test_workers_refuse_a_single_nats_identity(tmp_path: Path) -> None:
    """A router reads only its own reply subjects: N workers cannot share one identity."""
    creds = tmp_path / "router-r0.creds"
    creds.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "tierflow", "router", "--workers", "2"], env=os.environ | {"TIERFLOW_NATS_CREDS": str(creds)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "one NATS identity per worker" in done.stderr
