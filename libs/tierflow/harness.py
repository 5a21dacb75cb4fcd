"""A whole fabric as a child process (`tierflow up` on free ports), for tests and benchmarks.

Tests and `loadtest/` scripts both need "start the fabric the way a user does, on ports
nobody else uses, and tell me when it answers"; this is that, once. NATS ports come in
runs of three (client, monitor, route) so `--nats-cluster 3` works too; the NATS URL(s)
are read back from up's ready line, and the processes to kill from DATA/children.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierflow.cli.children_file import FILE_NAME as CHILDREN_FILE
from tierflow.cli.children_file import ChildRecord, read_children
from tierflow.runtime.nats_server import NatsServerConfig, listen_port_range
from tierflow.runtime.tls import LocalPki, TlsFiles, client_ssl_context

__all__ = ["Fabric", "MetricsScrape", "start_fabric", "free_port_run"]


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
    nats_urls: list[str]
    nats_monitor_port: int
    nats_cluster_port: int
    tls: bool = False  # started with --tls: HTTPS, gRPC over TLS, tls:// NATS (client certificates required)
    nats_auth: bool = True  # one NATS identity per process (DATA/auth); False: started with --no-nats-auth

    def creds(self, identity: str = "admin") -> Path | None:
        """The credentials file of the identity called `identity` (`admin`, `observer`,
        `router-r0`, `node-decode-0`, ...); None without NATS auth."""
        return self.data_dir / "auth" / f"{identity}.creds" if self.nats_auth else None

    def nats_env(self, identity: str = "admin") -> dict[str, str]:
        """Environment for a process connecting as `identity` (a CLI command, an extra
        service): `TIERFLOW_NATS_CREDS`, empty without NATS auth."""
        from tierflow.runtime.nats_auth import CREDS_ENV

        path = self.creds(identity)
        return {CREDS_ENV: str(path) if path is not None else ""}

    def nats_options(self, identity: str = "admin") -> dict[str, Any]:
        """What `nats.connect(fabric.nats_urls, **options)` needs besides the servers: the
        identity's key and inbox prefix, and the TLS context of a `--tls` fabric."""
        from tierflow.runtime import nats_auth

        path = self.creds(identity)
        options = nats_auth.connect_options(nats_auth.read_creds(path)) if path is not None else {}
        context = self.ssl_context()
        return {**options, **({"tls": context} if context is not None else {})}

    def add_identity(self, role: str, instance: str = "") -> str:
        """A new NATS identity (a test's extra node `add_identity("node", "canary-0")`),
        taken by every NATS server of the fabric before this returns; its name, for
        `nats_env` / `nats_options`. A no-op without NATS auth."""
        from tierflow.cli.auth_files import AuthStore
        from tierflow.runtime.nats_auth import Identity

        identity = Identity(role, instance)
        if self.nats_auth and AuthStore(self.data_dir / "auth").ensure([identity]):
            self._reload_nats()
        return identity.name

    def _reload_nats(self, timeout: float = 10.0) -> None:
        """SIGHUP every NATS server and wait until each one's /varz shows a newer config."""

        def loaded(port: int) -> str:
            with urllib.request.urlopen(f"http://{self.host}:{port}/varz", timeout=2) as response:
                return str(json.loads(response.read()).get("config_load_time", ""))

        members = self.nats_members()
        names = ["nats"] if len(members) == 1 else [m.name for m in members]
        monitor = {name: m.monitor_port for name, m in zip(names, members, strict=True)}
        servers = [(c.pid, monitor[c.name]) for c in self.children() if c.role == "nats" and c.state == "running" and c.name in monitor]
        before = {pid: loaded(port) for pid, port in servers}
        for pid, _ in servers:
            os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while any(loaded(port) == before[pid] for pid, port in servers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the NATS servers of {self.data_dir} did not reload their config in {timeout:g}s")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.http_port}/v1"

    @property
    def tls_ca(self) -> Path | None:
        """The CA every server of a `--tls` fabric is signed by (None without TLS)."""
        return self.data_dir / "tls" / "ca.pem" if self.tls else None

    @property
    def client_tls(self) -> TlsFiles | None:
        """A client's files under `--tls`: the CA, and the client certificate NATS asks for."""
        return LocalPki(self.data_dir / "tls").client if self.tls else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """An SSLContext verifying the fabric's CA and presenting the client certificate
        (for httpx, nats-py, urllib); None without TLS."""
        files = self.client_tls
        return client_ssl_context(files) if files is not None else None

    @property
    def nats_url(self) -> str:
        """What `--nats-url` takes: the server's URL, or a cluster's URLs comma separated."""
        return ",".join(self.nats_urls)

    def nats_members(self) -> list[NatsServerConfig]:
        """The NATS server(s) as `tierflow up` configured them (for `wait_cluster_ready`,
        `meta_group`, or a member's ports)."""
        from tierflow.cli.up import UpConfig  # heavy (gRPC, typer): only for callers that ask

        config = UpConfig(host=self.host, data_dir=self.data_dir, nats_port=self.nats_port, nats_monitor_port=self.nats_monitor_port,
                          nats_cluster_port=self.nats_cluster_port, nats_cluster=len(self.nats_urls), tls=self.tls)  # fmt: skip
        return config.nats_members()

    def children(self) -> list[ChildRecord]:
        """What `tierflow up` runs now (DATA/children.json): name, role, pid, restarts, state."""
        return read_children(self.data_dir / CHILDREN_FILE)

    def child(self, name: str) -> ChildRecord:
        """The child called `name` (KeyError, listing the names, if there is none)."""
        children = self.children()
        for record in children:
            if record.name == name:
                return record
        raise KeyError(f"no child {name!r}; tierflow up runs {', '.join(c.name for c in children)}")

    def log(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def request_records(self, router: str = "router", *, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The router's request records so far, waiting (up to `timeout`) until there are
        `at_least`: a router writes its records buffered, once per loop turn, so the one for
        a response just read may land a moment after the response."""
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in (_json_line(line) for line in self.log(router).splitlines()) if r is not None and r.get("msg") == "request"]
            if len(records) >= at_least or time.monotonic() >= deadline:
                return records
            time.sleep(0.05)

    def request_record(self, request_id: str, router: str = "router", *, timeout: float = 5.0) -> dict[str, Any]:
        """The router's record of one request (see `request_records`); AssertionError if none comes."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.request_records(router, timeout=0):
                if record.get("request_id") == request_id:
                    return record
            if time.monotonic() >= deadline:
                raise AssertionError(f"no request record for {request_id} in the {router} log")
            time.sleep(0.05)

    def scrape_router(self) -> MetricsScrape:
        """One read of the router's `/metrics` (compare series from the same scrape: two
        reads of a live histogram race)."""
        base = self.base_url.removesuffix("/v1")
        context = self.ssl_context() if self.tls else None
        with urllib.request.urlopen(f"{base}/metrics", timeout=5, context=context) as response:
            return MetricsScrape(response.read().decode())

    def router_metric(self, name: str, **labels: str) -> float:
        """`scrape_router().value(name, **labels)`: what a test compares before/after."""
        return self.scrape_router().value(name, **labels)

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


class MetricsScrape:
    """A Prometheus text exposition, parsed once (prometheus-client's parser)."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0.0 if none)."""
        return sum(s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class _PortPicker:
    """Free ports for one fabric, none of them twice: every port picked stays bound until
    `release()`, so a later pick (a run, or an OS-chosen single port) cannot land on it."""

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        return sock

    def run(self, n: int) -> int:
        """The first of `n` consecutive free ports (`tierflow up` hands out metrics ports in a run)."""
        first, last = listen_port_range()
        for _ in range(200):
            base = random.randint(first, last - n)
            socks: list[socket.socket] = []
            try:
                for port in range(base, base + n):
                    socks.append(self._bind(port))
            except OSError:
                for sock in socks:
                    sock.close()
                continue
            self._held += socks
            return base
        raise RuntimeError(f"no run of {n} free ports")

    def one(self) -> int:
        return self.run(1)

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held = []


def _json_line(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:  # a line cut by a write in progress
        return None
    return value if isinstance(value, dict) else None


def free_port_run(n: int) -> int:
    """The first of `n` consecutive ports free right now (released again: racy, as every
    free-port helper is; a fabric's own ports come from one `_PortPicker`)."""
    picker = _PortPicker()
    try:
        return picker.run(n)
    finally:
        picker.release()


# `tierflow up`'s ready line names the NATS server(s): "... NATS nats://h:p[,nats://h:p...]  ..."
_NATS_IN_READY_LINE = re.compile(r"\bNATS (\S+)")


def start_fabric(data_dir: Path, *extra: str, ready_timeout: float = 90.0, env: dict[str, str] | None = None, cwd: Path | None = None) -> Fabric:
    """`tierflow up` on free ports; returns once it printed its ready line."""
    picker = _PortPicker()
    try:
        metrics_base = picker.run(16)
        ports = {name: picker.one() for name in ("http", "grpc", "registry")}
        nats_base = picker.run(9)  # client, monitor and route ports of up to a 3-server cluster
    finally:
        picker.release()
    nats = {"nats": nats_base, "monitor": nats_base + 3, "cluster": nats_base + 6}
    argv = [
        sys.executable, "-m", "tierflow", "up",
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--registry-grpc-port", str(ports["registry"]), "--nats-port", str(nats["nats"]),
        "--nats-monitor-port", str(nats["monitor"]), "--nats-cluster-port", str(nats["cluster"]),
        "--metrics-base-port", str(metrics_base),
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
                found = _NATS_IN_READY_LINE.search(line)
                urls = found.group(1).split(",") if found else [f"nats://127.0.0.1:{nats['nats']}"]
                return Fabric(process, "127.0.0.1", ports["http"], ports["grpc"], ports["registry"], nats["nats"], data_dir, line.strip(), urls,
                              nats_monitor_port=nats["monitor"], nats_cluster_port=nats["cluster"], tls="--tls" in extra,
                              nats_auth="--no-nats-auth" not in extra)  # fmt: skip
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("tierflow up did not become ready:\n" + out_path.read_text())
