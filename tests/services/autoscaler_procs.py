"""Real autoscaler processes for tests: start (`python -m tierflow autoscaler`), SIGKILL,
read their /metrics, and watch the lease they fight over."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from prometheus_client.parser import text_string_to_metric_families

from tierflow.contracts import subjects
from tierflow.contracts.autoscaler import Lease, lease_decoder
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.processes import die_with_parent_preexec

__all__ = ["AutoscalerProcess", "start_autoscaler", "current_lease"]


@dataclass
class AutoscalerProcess:
    instance: str
    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path

    def kill(self) -> None:
        """SIGKILL: no clean-up, no lease released (what a crash or an OOM kill does)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def metric(self, name: str, **labels: str) -> float | None:
        """The sum of `name`'s samples matching `labels` (None: no such sample)."""
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
                return resp.read().decode()

        text = await asyncio.to_thread(scrape)
        values = [s.value for family in text_string_to_metric_families(text) for s in family.samples
                  if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip
        return sum(values) if values else None

    async def wait_serving(self, timeout: float = 60.0) -> None:
        """Until its /metrics answers (it is up and registered its collectors)."""
        async with asyncio.timeout(timeout):
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"autoscaler {self.instance} exited ({self.process.returncode}):\n{self.log()[-3000:]}")
                try:
                    await self.metric("tierflow_autoscaler_leader")
                    return
                except OSError:
                    await asyncio.sleep(0.1)


def start_autoscaler(nats_url: str, instance: str, log_dir: Path, *flags: str) -> AutoscalerProcess:
    port = free_port()
    log_path = log_dir / f"{instance}.log"
    argv = [sys.executable, "-m", "tierflow", "autoscaler", "--nats-url", nats_url, "--instance-id", instance,
            "--metrics-port", str(port), *flags]  # fmt: skip
    with log_path.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   preexec_fn=die_with_parent_preexec(signal.SIGKILL))  # fmt: skip
    return AutoscalerProcess(instance, process, port, log_path)


async def current_lease(nc: NATS) -> Lease | None:
    try:
        kv = await nc.jetstream().key_value(subjects.AUTOSCALER_BUCKET)
        entry = await kv.get(subjects.AUTOSCALER_LEASE_KEY)
    except (BucketNotFoundError, KeyNotFoundError):
        return None
    return lease_decoder.decode(entry.value) if entry.value else None
