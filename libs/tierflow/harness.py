"""A whole fabric as a child process (`tierflow up` on free ports), for tests and benchmarks.

Tests and `loadtest/` scripts both need "start the fabric the way a user does, on ports
nobody else uses, and tell me when it answers"; this is that, once.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tierflow.runtime.nats_server import free_port

__all__ = ["Fabric", "start_fabric"]


@dataclass
class Fabric:
    """A running `tierflow up`: its ports, its data dir and its process."""

    process: subprocess.Popen[str]
    host: str
    http_port: int
    grpc_port: int
    registry_grpc_port: int
    nats_port: int
    data_dir: Path
    ready_line: str

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/v1"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.nats_port}"

    def log(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def _free_port_run(n: int) -> int:
    """The first of `n` consecutive free ports (`tierflow up` hands out metrics ports in a run)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no run of {n} free ports")


def start_fabric(data_dir: Path, *extra: str, ready_timeout: float = 90.0, env: dict[str, str] | None = None, cwd: Path | None = None) -> Fabric:
    """`tierflow up` on free ports; returns once it printed its ready line."""
    metrics_base = _free_port_run(12)
    ports = {name: free_port() for name in ("http", "grpc", "registry", "nats", "monitor")}
    argv = [
        sys.executable, "-m", "tierflow", "up",
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--registry-grpc-port", str(ports["registry"]), "--nats-port", str(ports["nats"]),
        "--nats-monitor-port", str(ports["monitor"]), "--metrics-base-port", str(metrics_base),
        "--data-dir", str(data_dir), "--ready-timeout", str(ready_timeout), *extra,
    ]  # fmt: skip
    # Output goes to a file, not a pipe: nobody reads a pipe after start-up, and a full
    # pipe would block `tierflow up` the moment it reports a child's exit.
    out_path = data_dir / "up.out"
    with open(out_path, "w") as out:
        process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + ready_timeout + 10
    while time.monotonic() < deadline and process.poll() is None:
        for line in out_path.read_text().splitlines():
            if "tierflow is up" in line:
                return Fabric(process, "127.0.0.1", ports["http"], ports["grpc"], ports["registry"], ports["nats"], data_dir, line.strip())
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("tierflow up did not become ready:\n" + out_path.read_text())
