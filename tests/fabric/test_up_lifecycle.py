"""`tierflow up` stops every process it started, on Ctrl-C as on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.fabric


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_stops_every_child_and_exits_0(tmp_path_factory: pytest.TempPathFactory, fabric_factory) -> None:
    fabric = fabric_factory(tmp_path_factory.mktemp("lifecycle"))
    try:
        out = subprocess.run([sys.executable, "-m", "tierflow", "status", "--json", "--nats-url", fabric.nats_url], capture_output=True, text=True, timeout=30)
        status = json.loads(out.stdout)
        pids = {int(s["metadata"]["pid"]) for s in status["services"]} | {n["pid"] for n in status["nodes"]}
        assert len(pids) == 6, status  # registry, router, autoscaler, prefill, 2 decode
        children = subprocess.run(["pgrep", "-P", str(fabric.process.pid)], capture_output=True, text=True).stdout.split()
        nats_pids = {int(p) for p in children} - pids
        assert len(nats_pids) == 1, (children, pids)  # and the NATS server
        fabric.process.send_signal(signal.SIGINT)
        assert fabric.process.wait(30) == 0
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids | nats_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids | nats_pids if _alive(p)]
    finally:
        fabric.stop()
