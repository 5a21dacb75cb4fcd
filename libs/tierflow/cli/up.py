"""`tierflow up`: the whole fabric on one machine, as real processes.

Why processes and not tasks in one interpreter: the services share nothing but NATS in
production, and running them the same way locally is what makes kill-and-restart,
per-service logs and metrics behave like the real thing.

Sequence: preflight (ports free, fleet file present, nats-server found) -> NATS: one
nats-server with JetStream under DATA/nats, or with `--nats-cluster N` a JetStream cluster
of N (members `nats-0`.. with stores under DATA/nats/<name>, generated config files beside
them), ready once every member is healthy and the meta group has a leader -> model-registry
and the router(s) (`--routers N`: N processes sharing the HTTP and gRPC ports through
SO_REUSEPORT, each with its own metrics port and log) -> once the registry's gRPC health
says SERVING (the fleet file is applied), prefill and decode nodes -> poll `/health` until
it reports enough nodes and at least one model (and every router's metrics hear the
nodes) -> the autoscaler, until it answers service discovery (each service is
`python -m tierflow <service> ...`) -> print one "is up" line -> run until Ctrl-C /
SIGTERM -> stop services, then NATS -> exit 0.

If a child dies before the fabric is ready, or the ready timeout passes: report it with
its log tail, stop everything, exit 1. After ready, a child that dies is started again
(same name, flags, ports, store dir) after a backoff, as a ReplicaSet would
(`tierflow.cli.restarts`; `--no-restart` turns that off); one that keeps dying is given
up on, which is fatal when too few of its kind are left (`quorum`: a majority of the NATS
servers, one router, the registry) and reported otherwise. Nodes stopped on purpose (the
autoscaler's scale-down) are not restarted, nor is anything once shutdown has begun.
DATA/children.json always lists the children (`tierflow.cli.children_file`), and
DATA/logs/up.log has up's own records (restarts, give-ups, nodes started and stopped).

`tierflow up` owns the node processes, so it is also the other end of the autoscaler's
local actuator: it answers `subjects.SUPERVISOR_CONTROL` (start a decode/prefill node
for a deployment with the next free node id and metrics port, stop a named node, list
them). The autoscaler runs with `--actuator local` by default (`tierflow up --actuator none`
makes its decisions advisory).

`--tls`: before NATS starts, the local CA and certificates under DATA/tls
(`tierflow.runtime.tls.ensure_local_pki`: made once, reused after); NATS then requires TLS
and a client certificate, every child gets TIERFLOW_TLS_CERT/KEY/CA, up's own health
checks and connections verify the CA, and DATA/tls/in-use tells the CLI to use them.

NATS auth (on unless `--no-nats-auth`): every child connects as its own identity
(`runtime/nats_auth.py`), its credentials file named by TIERFLOW_NATS_CREDS; DATA/auth holds
them and the servers' authorization block (`cli/auth_files.py`), made on the first run and
reused after. Routers are `r0`, `r1`, ... (their identity allows only that id's reply
streams). Identities for the nodes the autoscaler may ask for are made ahead
(`NODE_IDENTITY_BATCH` per role); past them, a new batch is added and every running NATS
server reloads its config before the node starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import signal
import socket
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO

import grpc
import msgspec
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats import connect as nats_connect
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from tierflow.cli.auth_files import AuthStore, reload_servers
from tierflow.cli.children_file import FILE_NAME as CHILDREN_FILE
from tierflow.cli.children_file import snapshot, write_children
from tierflow.cli.restarts import Restarter, RestartPolicy
from tierflow.cli.supervisor import ChildExit, ProcessSpec, Supervisor
from tierflow.contracts import messages, subjects
from tierflow.nodehost.profiles import read_profiles_file
from tierflow.rdu import load_profiles
from tierflow.runtime import discovery, nats_auth
from tierflow.runtime.admin_token import admin_token_path, ensure_admin_token
from tierflow.runtime.logs import JsonFormatter
from tierflow.runtime.nats_auth import Identity
from tierflow.runtime.nats_server import (
    NatsServerConfig,
    NatsServerNotFound,
    NatsServerNotReady,
    NatsTls,
    cluster_configs,
    cluster_url,
    connect_host,
    http_get,
    wait_cluster_ready,
)
from tierflow.runtime.service import nats_servers, server_round_trip
from tierflow.runtime.tls import IN_USE, LocalPki, TlsFiles, client_ssl_context, default_hosts, ensure_local_pki, grpc_channel_credentials

__all__ = ["NodeLauncher", "SupervisorControl", "UpConfig", "nats_specs", "preflight", "run_up", "service_specs", "up"]

_log = logging.getLogger(__name__)

NATS_NAME = "nats"  # the single server's child name, and every NATS child's role
ROUTER_NAME = "router"
REGISTRY_NAME = "model-registry"
AUTOSCALER_NAME = "autoscaler"
STOP_GRACE = 5.0
HEALTH_POLL_INTERVAL = 0.25
LIVE_NODES_METRIC = "tierflow_router_live_nodes"
# Extra environment for services: unbuffered so log files (and death reports) are current.
SERVICE_ENV = {"PYTHONUNBUFFERED": "1"}
# A node asked to stop drains first (its --drain-grace, 10 s by default); then SIGKILL.
NODE_STOP_GRACE = 15.0
ACTUATORS = ("local", "none")
NODE_COMMANDS = {"decode": "decode-node", "prefill": "prefill-node"}
# NATS identities made ahead for the nodes the autoscaler may ask for (`decode-0` .. and
# `prefill-0` .. this many past the ones started at once), and again in batches this size
# when they run out: a node then starts with no NATS config reload. Reloading the users of
# a JetStream cluster (nats-server 2.15) was followed by lost messages when a member died
# later (the fault suite's NATS kill: a token of ~30 streams lost), never without a reload.
NODE_IDENTITY_BATCH = 32


class FabricNotReady(Exception):
    """The router did not report a ready fabric before the deadline."""


@dataclass(frozen=True)
class UpConfig:
    """Everything `tierflow up` was asked for, validated once."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    registry_grpc_port: int = 50052
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    data_dir: Path = Path(".tierflow")
    fleet: Path = Path("deploy/examples/fleet.yaml")
    decode_nodes: int = 2
    prefill_nodes: int = 1
    deployment: str = "default"
    metrics_base_port: int = 9100
    ready_timeout: float = 60.0
    actuator: str = "local"
    profiles: Path | None = None  # extra hardware profiles (YAML) for the registry's checks and the nodes
    nats_cluster: int = 1  # NATS servers; more than one form a JetStream cluster
    nats_cluster_port: int = 6222  # first route port of a cluster's members
    routers: int = 1  # router processes sharing the HTTP and gRPC ports
    restart: bool = True  # restart children that die after the fabric is ready
    tls: bool = False  # TLS on HTTP, gRPC and NATS, from the local CA under DATA/tls (runtime/tls.py)
    allow_anonymous: bool = True  # routers without a tenants file serve everyone as the open tenant (local runs)
    nats_auth: bool = True  # one NATS identity per process, anonymous refused (DATA/auth, runtime/nats_auth.py)

    def __post_init__(self) -> None:
        if self.nats_cluster < 1:
            raise ValueError(f"at least one NATS server is needed, got --nats-cluster {self.nats_cluster}")
        if self.routers < 1:
            raise ValueError(f"at least one router is needed, got --routers {self.routers}")
        if self.actuator not in ACTUATORS:
            raise ValueError(f"actuator must be one of {', '.join(ACTUATORS)}, got {self.actuator!r}")
        if self.decode_nodes < 1:
            raise ValueError("at least one decode node is needed")
        if self.prefill_nodes < 0:
            raise ValueError("prefill node count cannot be negative")
        if self.ready_timeout <= 0:
            raise ValueError("ready timeout must be positive")

    @property
    def static_metrics_ports(self) -> int:
        """Metrics ports the services started at once take (registry, autoscaler, nodes,
        then each router when there are several: one router serves /metrics on its HTTP port)."""
        return 2 + self.prefill_nodes + self.decode_nodes + len(self.router_metrics_ports())

    def router_names(self) -> list[str]:
        """`router` alone (its log stays router.log), or `router-0`, `router-1`, ..."""
        return [ROUTER_NAME] if self.routers == 1 else [f"{ROUTER_NAME}-{i}" for i in range(self.routers)]

    def router_metrics_ports(self) -> list[int]:
        """Each router's own /metrics port when there are several (on the shared HTTP port
        a scrape would reach whichever router the kernel picks); none for a single one."""
        if self.routers == 1:
            return []
        first = self.metrics_base_port + 2 + self.prefill_nodes + self.decode_nodes
        return [first + i for i in range(self.routers)]

    def service_env(self) -> dict[str, str]:
        """The environment every service process gets (nodes the autoscaler asks for too).

        The profiles file goes by environment: the registry and the nodes read it as their
        `--profiles` setting, and the other services have no such setting to read.
        """
        env = dict(SERVICE_ENV)
        if self.profiles is not None:
            env["TIERFLOW_PROFILES"] = str(self.profiles.resolve())
        # Every service's --tls-cert/--tls-key/--tls-ca (nodes started later too), set either
        # way: files a shell exported for the CLI must not turn TLS on in a plain fabric.
        files = self.pki.server if self.tls else TlsFiles()
        env |= {f"TIERFLOW_TLS_{part.upper()}": str(Path(path).resolve()) if path else ""
                for part, path in (("cert", files.cert), ("key", files.key), ("ca", files.ca))}  # fmt: skip
        # The registry's admin token file (made by run_up: DATA/auth/admin.token) and the
        # routers' open tenant go by environment too (only the registry reads the one, only
        # routers the other), set either way: a token or opt-in a shell exported for the CLI
        # must not reach a service.
        env |= {"TIERFLOW_ADMIN_TOKEN_FILE": str(admin_token_path(self.data_dir).resolve()), "TIERFLOW_ADMIN_TOKEN": "",
                "TIERFLOW_ADMIN_TOKEN_HASH": "", "TIERFLOW_ALLOW_ANONYMOUS": "true" if self.allow_anonymous else "false"}
        return env

    @property
    def auth(self) -> AuthStore:
        """DATA/auth: every NATS identity's credentials and the servers' authorization block."""
        return AuthStore(self.data_dir / "auth")

    def router_ids(self) -> list[str]:
        """Each router's id under NATS auth (its identity allows only that id's subjects)."""
        return [f"r{i}" for i in range(self.routers)]

    def nats_identity_env(self, identity: Identity | None) -> dict[str, str]:
        """The credentials a child connects with (`$TIERFLOW_NATS_CREDS`); set, empty, without
        auth too, so credentials a shell exported for the CLI never reach a service."""
        path = str(self.auth.creds_path(identity).resolve()) if self.nats_auth and identity is not None else ""
        return {nats_auth.CREDS_ENV: path}

    def nats_options(self, identity: Identity) -> dict[str, Any]:
        """`nats.connect` arguments for `identity` (up's own connections); none without auth."""
        return nats_auth.connect_options(nats_auth.read_creds(self.auth.creds_path(identity))) if self.nats_auth else {}

    @property
    def pki(self) -> LocalPki:
        """DATA/tls: the local CA, the services' certificate and the clients' (`--tls`)."""
        return LocalPki(self.data_dir / "tls")

    def client_tls(self) -> TlsFiles | None:
        """What up itself (and the CLI, tests) connects with under `--tls`; None without."""
        return self.pki.client if self.tls else None

    def nats_tls(self) -> NatsTls | None:
        """TLS on the NATS servers under `--tls`: the services' certificate, and clients
        must show one signed by the CA too (every tierflow process and the CLI has one)."""
        if not self.tls:
            return None
        files = self.pki.server
        return NatsTls(Path(files.cert).resolve(), Path(files.key).resolve(), Path(files.ca).resolve(), verify=True)

    @property
    def logs_dir(self) -> Path:
        """DATA/logs: one `<child>.log` per process."""
        return self.data_dir / "logs"

    def nats_members(self) -> list[NatsServerConfig]:
        """The NATS servers this fabric runs: one with its store in DATA/nats, or a cluster
        whose member i listens on --nats-port + i, --nats-monitor-port + i and
        --nats-cluster-port + i, with its store in DATA/nats/nats-<i>."""
        if self.nats_cluster == 1:
            return [NatsServerConfig(store_dir=self.data_dir / "nats", host=self.host, port=self.nats_port,
                                     monitor_port=self.nats_monitor_port, name="tierflow", tls=self.nats_tls(),
                                     extra_config=self._nats_auth_config())]  # fmt: skip
        return cluster_configs(self.data_dir / "nats", self.nats_cluster, host=self.host, port=self.nats_port,
                               monitor_port=self.nats_monitor_port, cluster_port=self.nats_cluster_port, tls=self.nats_tls(),
                               extra_config=self._nats_auth_config())  # fmt: skip

    def _nats_auth_config(self) -> Path | None:
        return self.auth.server_config.resolve() if self.nats_auth else None

    @property
    def nats_url(self) -> str:
        """What services get as `--nats-url`: one URL, or the members' URLs comma separated."""
        return cluster_url(self.nats_members())

    def quorum(self) -> dict[str, int]:
        """How many children of each role the fabric cannot do without: a majority of the
        NATS servers (JetStream needs it), one router, the registry. Other roles: none."""
        return {NATS_NAME: self.nats_cluster // 2 + 1, ROUTER_NAME: 1, REGISTRY_NAME: 1}

    def ready_line(self) -> str:
        """The single line printed once the fabric answers."""
        routers = f" ({self.routers} routers)" if self.routers > 1 else ""
        tls = f"  TLS: CA {self.pki.ca}, client certificate {self.pki.client.cert}" if self.tls else ""
        return (
            f"tierflow is up: OpenAI {'https' if self.tls else 'http'}://{self.host}:{self.http_port}/v1{routers}  "
            f"gRPC {self.host}:{self.grpc_port}  registry {self.host}:{self.registry_grpc_port}  "
            f"NATS {self.nats_url}  (logs: {self.logs_dir}){tls}"
        )


def nats_specs(config: UpConfig) -> list[ProcessSpec]:
    """The NATS server processes, in start order (raises NatsServerNotFound without a binary).

    The single server is the child `nats` (log nats.log); a cluster's members are
    `nats-0`, `nats-1`, ... Every one has the role `nats`.
    """
    members = config.nats_members()
    names = [NATS_NAME] if len(members) == 1 else [m.name for m in members]
    return [ProcessSpec(name, m.argv(), None, config.logs_dir / f"{name}.log", role=NATS_NAME) for name, m in zip(names, members, strict=True)]


def service_specs(config: UpConfig, *, python: str = sys.executable) -> list[ProcessSpec]:
    """The services to start, in start order, with exactly the flags of the service contract.

    Each non-router service gets the next metrics port from `metrics_base_port`, in this
    order; a single router serves /metrics on its HTTP port (`--metrics-port 0`), several
    take the ports after those (`UpConfig.router_metrics_ports`) and share the HTTP and
    gRPC ports (`--reuse-port`; gRPC sets SO_REUSEPORT by default on Linux).
    """
    nats_url = config.nats_url
    metrics = iter(range(config.metrics_base_port, 65536))
    fleet = str(config.fleet.resolve())

    def spec(name: str, *args: str, env: dict[str, str] | None = None, identity: Identity | None = None) -> ProcessSpec:
        return ProcessSpec(name, [python, "-m", "tierflow", *args], {**config.service_env(), **config.nats_identity_env(identity), **(env or {})},
                           config.logs_dir / f"{name}.log", role=args[0])  # fmt: skip

    router_metrics = config.router_metrics_ports() or [0]
    routers = [
        spec(name, "router", "--nats-url", nats_url, "--http-host", config.host, "--http-port", str(config.http_port),
             "--grpc-port", str(config.grpc_port), "--metrics-port", str(router_metrics[i]),
             *(["--reuse-port"] if config.routers > 1 else []), identity=Identity(nats_auth.ROUTER, config.router_ids()[i]))
        for i, name in enumerate(config.router_names())
    ]  # fmt: skip
    specs = [
        spec(REGISTRY_NAME, "model-registry", "--nats-url", nats_url, "--grpc-port", str(config.registry_grpc_port),
             "--fleet", fleet, "--metrics-port", str(next(metrics)), identity=Identity(nats_auth.REGISTRY)),
        *routers,
        # The actuator goes by environment, not flag: the flags are the service contract.
        spec(AUTOSCALER_NAME, "autoscaler", "--nats-url", nats_url, "--metrics-port", str(next(metrics)),
             env={"TIERFLOW_ACTUATOR": config.actuator}, identity=Identity(nats_auth.AUTOSCALER)),
    ]  # fmt: skip
    for i in range(config.prefill_nodes):
        specs.append(spec(f"prefill-{i}", "prefill-node", "--nats-url", nats_url, "--node-id", f"prefill-{i}",
                          "--metrics-port", str(next(metrics)), identity=Identity(nats_auth.NODE, f"prefill-{i}")))  # fmt: skip
    for i in range(config.decode_nodes):
        specs.append(spec(f"decode-{i}", "decode-node", "--nats-url", nats_url, "--node-id", f"decode-{i}",
                          "--deployment", config.deployment, "--metrics-port", str(next(metrics)),
                          identity=Identity(nats_auth.NODE, f"decode-{i}")))  # fmt: skip
    return specs


def _listen_ports(config: UpConfig) -> list[tuple[str, int]]:
    """Every TCP port the fabric will listen on, labelled for error messages."""
    ports = [
        ("router HTTP (--http-port)", config.http_port),
        ("router gRPC (--grpc-port)", config.grpc_port),
        ("registry gRPC (--registry-grpc-port)", config.registry_grpc_port),
    ]
    for i, member in enumerate(config.nats_members()):
        plus = f" +{i}" if config.nats_cluster > 1 else ""
        ports += [(f"NATS (--nats-port{plus})", member.port), (f"NATS monitoring (--nats-monitor-port{plus})", member.monitor_port)]
        if member.cluster is not None:
            ports.append((f"NATS cluster routes (--nats-cluster-port{plus})", member.cluster.port))
    n_metrics = config.static_metrics_ports
    ports += [(f"metrics (--metrics-base-port +{i})", config.metrics_base_port + i) for i in range(n_metrics)]
    return ports


def _port_problem(host: str, port: int) -> str | None:
    """None if `port` can be bound on `host` the way a server would (SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def preflight(config: UpConfig) -> list[str]:
    """Problems to fix before anything starts (empty list: go).

    Checked up front because a port clash found by the fifth child would mean starting
    and stopping four processes only to print a worse message.
    """
    problems: list[str] = []
    seen: dict[int, str] = {}
    for label, port in _listen_ports(config):
        if not 0 < port < 65536:
            problems.append(f"{label}: {port} is not a valid port")
        elif port in seen:
            problems.append(f"{label} and {seen[port]} are both set to port {port}")
        else:
            seen[port] = label
            problem = _port_problem(config.host, port)
            if problem:
                problems.append(f"port {port} on {config.host} ({label}) is already in use: {problem}")
    if not config.fleet.is_file():
        problems.append(f"fleet file {config.fleet} not found (pass --fleet FILE)")
    if config.profiles is not None:
        try:
            load_profiles(read_profiles_file(str(config.profiles)))
        except ValueError as exc:
            problems.append(str(exc))
    try:
        nats_specs(config)
    except NatsServerNotFound as exc:
        problems.append(str(exc))
    return problems


def _count(value: Any) -> int:
    """`nodes`/`models` in /health may be a count or a list; anything else counts as 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, list | dict):
        return len(value)
    return 0


async def _routers_not_hearing(config: UpConfig, host: str, timeout: float) -> str | None:
    """With several routers: the first one whose metrics do not count enough live nodes.

    `/health` on the shared port reaches whichever router the kernel picks, so each is
    asked on its own metrics port (`tierflow_router_live_nodes`, refreshed every second).
    """
    ports = config.router_metrics_ports()
    if not ports:
        return None  # one router: /health on its own port said it all
    for name, port in zip(config.router_names(), ports, strict=True):
        reply = await http_get(host, port, "/metrics", timeout=timeout)
        live = next((sample.value for family in text_string_to_metric_families(reply.body.decode("utf-8", "replace"))
                     for sample in family.samples if sample.name == LIVE_NODES_METRIC), None)  # fmt: skip
        if live is None or live < config.decode_nodes:
            return f"{name} (metrics port {port}) hears {0 if live is None else int(live)} of {config.decode_nodes} nodes"
    return None


async def _wait_fabric_ready(config: UpConfig, deadline: float) -> None:
    """Poll the router's GET /health until it is 200 {"status": "ok"} with enough nodes and a
    model, and (several routers) until every router hears enough nodes."""
    loop = asyncio.get_running_loop()
    host = connect_host(config.host)
    client_tls = config.client_tls()
    ssl_context = client_ssl_context(client_tls) if client_tls is not None else None
    last = "no answer yet"
    while True:
        timeout = max(0.05, min(1.0, deadline - loop.time()))
        try:
            reply = await http_get(host, config.http_port, "/health", timeout=timeout, ssl=ssl_context)
            last = f"HTTP {reply.status} {reply.body[:300].decode('utf-8', 'replace')}"
            if reply.status == 200:
                body = json.loads(reply.body)
                if (
                    isinstance(body, dict)
                    and body.get("status") == "ok"
                    and _count(body.get("nodes")) >= config.decode_nodes
                    and _count(body.get("models")) >= 1
                ):
                    deaf = await _routers_not_hearing(config, host, timeout)
                    if deaf is None:
                        return
                    last = f"/health ok, but {deaf}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except ValueError:
            pass  # not JSON yet; `last` already holds the raw answer
        if loop.time() >= deadline:
            raise FabricNotReady(
                f"router /health at {'https' if ssl_context else 'http'}://{host}:{config.http_port}/health not ready "
                f"(need status ok, nodes >= {config.decode_nodes}, models >= 1); last answer: {last}"
            )
        await asyncio.sleep(HEALTH_POLL_INTERVAL)


def _start_stages(specs: list[ProcessSpec]) -> tuple[list[ProcessSpec], list[ProcessSpec], list[ProcessSpec]]:
    """The processes in the order they may start: control plane, nodes, autoscaler.

    Nodes wait for the registry to have applied the fleet (they read their bundle once, at
    start: see `_wait_registry_ready`). The autoscaler waits until the router hears the
    nodes: started before them, its first tick would find the pool empty (nothing heard
    yet) and start `min_replicas` nodes more, beside the ones `up` is starting.
    """
    def stage(spec: ProcessSpec) -> int:
        if _node_of(spec) is not None:
            return 1
        return 2 if spec.name == AUTOSCALER_NAME else 0

    stages: tuple[list[ProcessSpec], list[ProcessSpec], list[ProcessSpec]] = ([], [], [])
    for spec in specs:
        stages[stage(spec)].append(spec)
    return stages


async def _wait_registry_ready(config: UpConfig, deadline: float) -> None:
    """Wait until the registry's gRPC health check says SERVING.

    The registry serves gRPC only after it has applied the fleet file, and nodes read their
    deployment's bundle once, when they start. Started together, a node could boot on what
    the registry held before (its state survives restarts: `tierflow up --fleet B` after a
    run of fleet A gave nodes A's 8k-token configs while the router already routed by B's
    32k limit, and every long prompt failed with context_length_exceeded).
    """
    loop = asyncio.get_running_loop()
    target = f"{connect_host(config.host)}:{config.registry_grpc_port}"
    last = "no answer yet"
    client_tls = config.client_tls()
    channel = grpc.aio.insecure_channel(target) if client_tls is None else grpc.aio.secure_channel(target, grpc_channel_credentials(client_tls))
    async with channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while True:
            try:
                timeout = max(0.05, min(1.0, deadline - loop.time()))
                reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if loop.time() >= deadline:
                raise FabricNotReady(f"model registry gRPC health at {target} not SERVING (it applies the fleet file first); last answer: {last}")
            await asyncio.sleep(HEALTH_POLL_INTERVAL)


async def _wait_registered(nats_url: str, service: str, deadline: float, *, tls: TlsFiles | None = None,
                           auth: dict[str, Any] | None = None) -> None:
    """Wait until `service` answers NATS service discovery (`tierflow status` lists it)."""
    loop = asyncio.get_running_loop()
    name = subjects.SERVICE_NAMES[service]
    tls_options = {"tls": client_ssl_context(tls)} if tls is not None else {}
    nc = await nats_connect(nats_servers(nats_url), name="tierflow-up-ready", connect_timeout=2, **tls_options, **(auth or {}))
    try:
        while name not in {s.name for s in await discovery.discover(nc, timeout=HEALTH_POLL_INTERVAL)}:
            if loop.time() >= deadline:
                raise FabricNotReady(f"{service} did not answer NATS service discovery ({name})")
    finally:
        await nc.close()


def _tails(supervisor: Supervisor, lines: int = 5) -> str:
    """The last lines of every child's log, for a timeout report."""
    out = []
    for child in supervisor.children:
        tail = child.log_tail(lines)
        status = "running" if child.returncode is None else f"exited {child.returncode}"
        out.append(f"{child.name} ({status}), {child.spec.log_path}:")
        out.extend(f"  | {line}" for line in tail or ["(empty)"])
    return "\n".join(out)


async def _race(work: Coroutine[Any, Any, None], exit_task: asyncio.Future[ChildExit], stop_task: asyncio.Future[Any]) -> str:
    """Run `work` until it finishes or a child dies or a stop is requested: 'exit' > 'stop' > 'done'.

    A child death wins ties, so it is never swallowed by a simultaneous success.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, exit_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if exit_task.done():
        return "exit"
    if stop_task.done():
        return "stop"
    task.result()  # raises the work's failure
    return "done"


def _below_quorum(supervisor: Supervisor, name: str, quorum: dict[str, int]) -> bool:
    """Whether the role of the dead child `name` has fewer running children than it needs."""
    try:
        role = supervisor.get(name).role
    except KeyError:
        return False  # stopped on purpose right after it died
    return sum(1 for c in supervisor.children if c.role == role and c.returncode is None) < quorum.get(role, 0)


async def _shutdown(supervisor: Supervisor, grace: float) -> None:
    """Services concurrently first, then NATS: services drain their NATS connections while it is up."""
    services = [child.name for child in supervisor.children if child.role != NATS_NAME]
    await supervisor.stop(*services, grace=grace)
    await supervisor.stop_all(grace=grace)


def _node_of(spec: ProcessSpec) -> messages.SupervisedNode | None:
    """The node a service spec runs, read off its argv (None for any other service)."""
    argv = spec.argv
    role = next((r for r, command in NODE_COMMANDS.items() if command in argv), None)
    if role is None:
        return None

    def flag(name: str, default: str) -> str:
        try:
            return argv[argv.index(name) + 1]
        except (ValueError, IndexError):
            return default

    port = flag("--metrics-port", "0")
    return messages.SupervisedNode(
        node_id=flag("--node-id", spec.name), role=role, deployment=flag("--deployment", "default"),  # type: ignore[arg-type]
        metrics_port=int(port) if port.isdigit() else 0,
    )


def _identities(config: UpConfig, specs: list[ProcessSpec]) -> list[Identity]:
    """Every NATS identity the fabric starts with: one per role, per router, per node, and
    the next `NODE_IDENTITY_BATCH` node ids of each role (the autoscaler's, made ahead)."""
    nodes = [node.node_id for spec in specs if (node := _node_of(spec)) is not None]
    started = {"decode": config.decode_nodes, "prefill": config.prefill_nodes}
    ahead = [f"{role}-{i}" for role, n in started.items() for i in range(n + NODE_IDENTITY_BATCH)]
    return nats_auth.fabric_identities(config.router_ids(), list(dict.fromkeys([*nodes, *ahead])))


def _identity_batch(node_id: str) -> list[Identity]:
    """`node_id`'s identity and, for `<role>-<n>`, the batch of ids after it (made together,
    so the next starts need no config reload)."""
    prefix, _, index = node_id.rpartition("-")
    if not prefix or not index.isdigit():
        return [Identity(nats_auth.NODE, node_id)]
    return [Identity(nats_auth.NODE, f"{prefix}-{i}") for i in range(int(index), int(index) + NODE_IDENTITY_BATCH)]


def _running_nats(config: UpConfig, supervisor: Supervisor) -> list[tuple[int, str, int]]:
    """(pid, monitor host, monitor port) of each NATS server running now."""
    members = config.nats_members()
    names = [NATS_NAME] if len(members) == 1 else [m.name for m in members]
    monitor = {name: m.monitor_port for name, m in zip(names, members, strict=True)}
    return [(c.pid, connect_host(config.host), monitor[c.name]) for c in supervisor.children
            if c.role == NATS_NAME and c.returncode is None and c.name in monitor and c.pid]  # fmt: skip


class NodeLauncher:
    """Starts and stops node processes on request: the far end of the local actuator.

    New nodes get the next node id of their role (`decode-2`, `decode-3`, ...; never
    reused, so a stopped node's last heartbeat cannot be mistaken for a new one) and the
    next free metrics port after the ones `service_specs` handed out. Only nodes can be
    stopped this way, never NATS, the router or the registry.
    """

    def __init__(self, config: UpConfig, supervisor: Supervisor, specs: list[ProcessSpec], *, python: str = sys.executable) -> None:
        self._config = config
        self._supervisor = supervisor
        self._python = python
        self._nodes: dict[str, messages.SupervisedNode] = {}
        for spec in specs:
            node = _node_of(spec)
            if node is not None:
                self._nodes[spec.name] = node
        self._next_index = {"decode": config.decode_nodes, "prefill": config.prefill_nodes}
        self._next_port = config.metrics_base_port + config.static_metrics_ports
        self.closing = False

    def nodes(self) -> list[messages.SupervisedNode]:
        """Node processes that are running now."""
        live = {c.name: c.pid for c in self._supervisor.children if c.returncode is None}
        return [msgspec.structs.replace(n, pid=live[name]) for name, n in self._nodes.items() if name in live]

    def _next_id(self, role: str) -> str:
        taken = {c.name for c in self._supervisor.children} | set(self._nodes)
        while True:
            node_id = f"{role}-{self._next_index[role]}"
            self._next_index[role] += 1
            if node_id not in taken:
                return node_id

    def _next_metrics_port(self) -> int:
        used = {n.metrics_port for n in self._nodes.values()}
        while self._next_port < 65536:
            port = self._next_port
            self._next_port += 1
            if port not in used and _port_problem(self._config.host, port) is None:
                return port
        raise RuntimeError("no free metrics port left")

    async def start(self, role: str, deployment: str, region: str = "") -> messages.SupervisedNode:
        if self.closing:
            raise RuntimeError("tierflow up is stopping")
        if role not in NODE_COMMANDS:
            raise ValueError(f"unknown node role {role!r}")
        if not deployment:
            raise ValueError("a node needs a deployment")
        node_id, port = self._next_id(role), self._next_metrics_port()
        args = [NODE_COMMANDS[role], "--nats-url", self._config.nats_url, "--node-id", node_id, "--deployment", deployment]
        if region:
            args += ["--region", region]
        args += ["--metrics-port", str(port)]
        identity = Identity(nats_auth.NODE, node_id)
        await self._admit(identity)
        spec = ProcessSpec(node_id, [self._python, "-m", "tierflow", *args], {**self._config.service_env(), **self._config.nats_identity_env(identity)},
                           self._config.logs_dir / f"{node_id}.log", role=NODE_COMMANDS[role])  # fmt: skip
        child = await self._supervisor.start(spec)
        node = messages.SupervisedNode(node_id=node_id, role=role, deployment=deployment, pid=child.pid, metrics_port=port)  # type: ignore[arg-type]
        self._nodes[node_id] = node
        _log.info("started node %s for %s (pid %d)", node_id, deployment, child.pid)
        return node

    async def _admit(self, identity: Identity) -> None:
        """Make sure a new node has its NATS identity before it starts: made ahead, or (past
        the batch made ahead) a new batch added to DATA/auth and every running server told
        to read its config again (RuntimeError if one does not)."""
        if not self._config.nats_auth or self._config.auth.creds_path(identity).exists():
            return  # made ahead (`_identities`): the usual case
        if not self._config.auth.ensure(_identity_batch(identity.instance)):
            return
        try:
            await reload_servers(_running_nats(self._config, self._supervisor))
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(f"NATS did not take {identity.name}'s credentials: {exc}") from exc
        _log.info("NATS identity %s added", identity.name, extra={"fields": {"identity": identity.name}})

    async def stop(self, node_id: str) -> None:
        """SIGTERM (the node drains), `NODE_STOP_GRACE`, then SIGKILL."""
        if node_id not in self._nodes:
            raise KeyError(f"{node_id!r} is not a node this supervisor runs")
        await self._supervisor.stop(node_id, grace=NODE_STOP_GRACE)
        _log.info("stopped node %s", node_id)

    async def handle(self, command: messages.SupervisorCommand) -> messages.SupervisorReply:
        """One control command, answered (errors too: the caller gets a reason, never silence)."""
        try:
            if command.action == "start":
                node = await self.start(command.role, command.deployment, command.region)
                return messages.SupervisorReply(node_id=node.node_id, nodes=self.nodes())
            if command.action == "stop":
                await self.stop(command.node_id)
                return messages.SupervisorReply(node_id=command.node_id, nodes=self.nodes())
            return messages.SupervisorReply(nodes=self.nodes())
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() adds quotes
            return messages.SupervisorReply(ok=False, error=str(message), node_id=command.node_id)


class SupervisorControl:
    """`subjects.SUPERVISOR_CONTROL`, answered for a `NodeLauncher` on its own connection.

    A plain request/reply subscription rather than a nats.micro service: `tierflow up`
    is not a fabric service, and `tierflow status` lists every micro service as one.
    Each request runs in its own task, so a slow stop never delays a list or a start.
    """

    def __init__(self, launcher: NodeLauncher) -> None:
        self._launcher = launcher
        self._nc: NATS | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None

    async def start(self, url: str, *, tls: TlsFiles | None = None, auth: dict[str, Any] | None = None) -> None:
        async def quiet(*_: object) -> None:
            pass

        tls_options = {"tls": client_ssl_context(tls)} if tls is not None else {}
        nc = await nats_connect(nats_servers(url), name="tierflow-up", connect_timeout=2, allow_reconnect=True,
                                max_reconnect_attempts=-1, reconnect_time_wait=0.25, error_cb=quiet, **tls_options, **(auth or {}))  # fmt: skip
        self._nc = nc

        async def answer(msg: Any) -> None:
            try:
                command = messages.supervisor_command_decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                reply = messages.SupervisorReply(ok=False, error=f"undecodable supervisor command: {exc}")
            else:
                reply = await self._launcher.handle(command)
            if msg.reply and not nc.is_closed:
                await nc.publish(msg.reply, messages.encoder.encode(reply))

        async def on_message(msg: Any) -> None:
            task = asyncio.ensure_future(answer(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._sub = await nc.subscribe(subjects.SUPERVISOR_CONTROL, cb=on_message)

    async def close(self) -> None:
        self._launcher.closing = True
        if self._nc is not None and not self._nc.is_closed:
            # Unsubscribe and flush first: once the server has answered the flush it has
            # dropped our interest, so a command sent after close() gets "no responders"
            # at once instead of waiting out its timeout on a connection that is going.
            with contextlib.suppress(Exception):  # the connection may be down already
                await self._sub.unsubscribe()
                await server_round_trip(self._nc, timeout=2)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()


def _prepare_tls(config: UpConfig) -> None:
    """Under `--tls`: the local CA and certificates in DATA/tls (made on the first run,
    reused after), and DATA/tls/in-use, which tells the CLI (`tierflow status`, `apply`, ...)
    to connect with them. Without: that marker goes, so the CLI speaks plain again."""
    marker = config.pki.directory / IN_USE
    if not config.tls:
        marker.unlink(missing_ok=True)
        return
    ensure_local_pki(config.pki.directory, hosts=default_hosts(config.host), now=datetime.datetime.now(datetime.UTC))
    marker.write_text("tierflow up --tls runs with the certificates in this directory\n")


async def run_up(
    config: UpConfig,
    stop: asyncio.Event,
    *,
    specs: list[ProcessSpec] | None = None,
    supervisor: Supervisor | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    grace: float = STOP_GRACE,
    policy: RestartPolicy | None = None,
) -> int:
    """Run the fabric until `stop` is set (returns 0) or something fatal happens (returns 1).

    `specs` replaces the services (tests pass small fakes); NATS is always real.
    `supervisor` lets the caller reach the children (e.g. to kill them on a second
    Ctrl-C). `policy` is the restart policy after ready (default `RestartPolicy()`;
    unused with `config.restart` off). Every child is stopped before this returns,
    whatever happened.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.ready_timeout
    members = config.nats_members()
    try:
        servers = nats_specs(config)
    except NatsServerNotFound as exc:
        print(f"tierflow up: {exc}", file=err)
        return 1
    services = service_specs(config) if specs is None else specs
    try:  # the registry's admin token: made on the first run, reused after
        ensure_admin_token(config.data_dir)
    except OSError as exc:
        print(f"tierflow up: cannot make the admin token {admin_token_path(config.data_dir)}: {exc}", file=err)
        return 1
    try:
        _prepare_tls(config)
    except (OSError, ValueError) as exc:
        print(f"tierflow up: cannot prepare TLS under {config.pki.directory}: {exc}", file=err)
        return 1
    if config.nats_auth:
        try:  # made on the first run, reused after; the servers read DATA/auth/nats-auth.conf
            config.auth.ensure(_identities(config, services))
        except (OSError, ValueError) as exc:
            print(f"tierflow up: cannot prepare the NATS credentials under {config.auth.directory}: {exc}", file=err)
            return 1
    for member in members:
        member.prepare()

    supervisor = supervisor if supervisor is not None else Supervisor()
    exit_task: asyncio.Future[ChildExit] = asyncio.ensure_future(supervisor.next_exit())
    stop_task = asyncio.ensure_future(stop.wait())
    control = SupervisorControl(NodeLauncher(config, supervisor, services))
    restarter: Restarter | None = None

    def children_changed() -> None:
        restarting = restarter.pending if restarter is not None else ()
        given_up = restarter.given_up if restarter is not None else ()
        write_children(config.data_dir / CHILDREN_FILE, snapshot(supervisor, restarting=restarting, given_up=given_up))

    supervisor.add_listener(children_changed)

    def died(event: ChildExit, prefix: str = "") -> int:
        print(f"tierflow up: {prefix}{event.describe()}", file=err)
        print("tierflow up: stopping everything", file=err)
        return 1

    try:
        for spec in servers:
            await supervisor.start(spec)
        try:
            outcome = await _race(wait_cluster_ready(members, max(0.1, deadline - loop.time())), exit_task, stop_task)
        except NatsServerNotReady as exc:
            print(f"tierflow up: {exc}\n{_tails(supervisor, 20)}", file=err)
            return 1
        if outcome == "exit":
            return died(exit_task.result(), "before the fabric was ready, ")
        if outcome == "stop":
            return 0
        try:
            await control.start(config.nats_url, tls=config.client_tls(), auth=config.nats_options(Identity(nats_auth.SUPERVISOR)))
        except Exception as exc:  # nats-py raises several unrelated types here
            print(f"tierflow up: cannot answer {subjects.SUPERVISOR_CONTROL} ({exc}); the autoscaler cannot start or stop nodes", file=err)

        async def start(stage: list[ProcessSpec]) -> int | None:
            """Start every process of `stage`; an exit code if one cannot start."""
            for spec in stage:
                try:
                    await supervisor.start(spec)
                except OSError as exc:
                    print(f"tierflow up: cannot start {spec.name} ({spec.argv[0]}): {exc}", file=err)
                    return 1
            return None

        async def wait(work: Coroutine[Any, Any, None]) -> int | None:
            """Wait for `work`; an exit code if a child died, a stop came or time ran out."""
            try:
                outcome = await _race(work, exit_task, stop_task)
            except FabricNotReady as exc:
                print(f"tierflow up: not ready after {config.ready_timeout:g}s: {exc}\n{_tails(supervisor)}", file=err)
                return 1
            if outcome == "exit":
                return died(exit_task.result(), "before the fabric was ready, ")
            return 0 if outcome == "stop" else None

        # In three steps, each waiting for what the next one reads (see _start_stages).
        control_plane, nodes, autoscaler = _start_stages(services)
        if (code := await start(control_plane)) is not None:
            return code
        if nodes and any(s.name == REGISTRY_NAME for s in control_plane):
            if (code := await wait(_wait_registry_ready(config, deadline))) is not None:
                return code
        if (code := await start(nodes)) is not None:
            return code
        if (code := await wait(_wait_fabric_ready(config, deadline))) is not None:
            return code
        if (code := await start(autoscaler)) is not None:
            return code
        if autoscaler and (code := await wait(_wait_registered(config.nats_url, AUTOSCALER_NAME, deadline, tls=config.client_tls(),
                                                                 auth=config.nats_options(Identity(nats_auth.SUPERVISOR))))) is not None:
            return code  # the ready line promises every service answers, this late one too

        if config.restart:
            restarter = Restarter(supervisor, policy or RestartPolicy(), quorum=config.quorum(),
                                  report=lambda line: print(line, file=err, flush=True), on_change=children_changed)  # fmt: skip
        print(config.ready_line(), file=out, flush=True)
        fatal: asyncio.Future[str] = restarter.fatal if restarter is not None else loop.create_future()
        while True:
            await asyncio.wait({exit_task, stop_task, fatal}, return_when=asyncio.FIRST_COMPLETED)
            if fatal.done():
                print(f"tierflow up: {fatal.result()}\ntierflow up: stopping everything", file=err)
                return 1
            if stop_task.done():
                return 0
            event = exit_task.result()
            exit_task = asyncio.ensure_future(supervisor.next_exit())
            if restarter is not None:
                restarter.handle(event)
                continue
            if _below_quorum(supervisor, event.name, config.quorum()):
                return died(event)
            print(f"tierflow up: {event.describe()}\ntierflow up: the rest keeps running", file=err)
    finally:
        supervisor.close()
        if restarter is not None:
            await restarter.close()
        for task in (exit_task, stop_task):
            task.cancel()
        await control.close()
        await _shutdown(supervisor, grace)
        supervisor.remove_listener(children_changed)


async def _main(config: UpConfig) -> int:
    """`run_up` with SIGINT/SIGTERM wired to a clean stop; a second signal SIGKILLs every child."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    supervisor = Supervisor()

    def on_signal() -> None:
        if stop.is_set():
            print("tierflow up: killing every child now", file=sys.stderr)
            supervisor.kill_all()
            return
        print("tierflow up: stopping (press Ctrl-C again to kill at once)", file=sys.stderr)
        stop.set()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    journal = _log_to_file(config.logs_dir / "up.log")
    try:
        return await run_up(config, stop, supervisor=supervisor)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        logging.getLogger("tierflow").removeHandler(journal)
        journal.close()


def _log_to_file(path: Path) -> logging.Handler:
    """up's own records (restarts, give-ups, nodes started and stopped) as JSON lines in
    DATA/logs/up.log, beside its children's logs; stderr keeps the lines meant for a person."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter("up"))
    logger = logging.getLogger("tierflow")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it is a tierflow dependency), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def up(
    host: Annotated[str, typer.Option(help="Address every service binds to and advertises.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="Router OpenAI HTTP port (also serves /metrics and /health).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="Router gRPC Inference port.")] = 50051,
    registry_grpc_port: Annotated[int, typer.Option(help="Model-registry gRPC admin port.")] = 50052,
    nats_port: Annotated[int, typer.Option(help="NATS client port (cluster member i: +i).")] = 4222,
    nats_monitor_port: Annotated[int, typer.Option(help="NATS monitoring port, /healthz (cluster member i: +i).")] = 8222,
    nats_cluster: Annotated[int, typer.Option(min=1, help="NATS servers: 1, or a JetStream cluster of N (3 survives losing one).")] = 1,
    nats_cluster_port: Annotated[int, typer.Option(help="First NATS cluster route port (member i: +i); used with --nats-cluster > 1.")] = 6222,
    routers: Annotated[int, typer.Option("--routers", "--router-workers", min=1, help="Router processes sharing the HTTP and gRPC ports "
                                         "(SO_REUSEPORT), each with its own NATS identity; --router-workers is the same option.")] = 1,
    restart: Annotated[bool, typer.Option(help="Restart children that die after the fabric is ready (with backoff; gives up after 6 exits in 60 s).")] = True,
    allow_anonymous: Annotated[bool, typer.Option("--allow-anonymous/--require-api-keys", help="Routers serve every caller, with any API key "
                                                  "or none, as the open tenant `anonymous` (local runs); --require-api-keys: 401 without a tenants file.")] = True,  # fmt: skip
    data_dir: Annotated[Path, typer.Option(help="NATS store under DATA/nats, logs under DATA/logs.")] = Path(".tierflow"),
    fleet: Annotated[Path, typer.Option(help="Fleet file loaded by the model registry.")] = Path("deploy/examples/fleet.yaml"),
    decode_nodes: Annotated[int, typer.Option(min=1, help="Decode nodes to start.")] = 2,
    prefill_nodes: Annotated[int, typer.Option(min=0, help="Prefill nodes to start.")] = 1,
    deployment: Annotated[str, typer.Option(help="Bundle deployment the decode nodes serve.")] = "default",
    metrics_base_port: Annotated[int, typer.Option(help="First /metrics port; each non-router service takes the next, then each router when there are several.")] = 9100,
    ready_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the fabric to answer /health.")] = 60.0,
    actuator: Annotated[str, typer.Option(help="How the autoscaler acts: local (starts and stops node processes here) or none (advisory).")] = "local",
    profiles: Annotated[Path | None, typer.Option(help="YAML file of extra hardware profiles deployments may name (see tierflow.nodehost.profiles).")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="TLS on HTTP, gRPC and NATS (clients of NATS need a certificate too), "
                                      "from a local CA made under DATA/tls on first use.")] = False,  # fmt: skip
    nats_auth_on: Annotated[bool, typer.Option("--nats-auth/--no-nats-auth", help="One NATS identity per process with only the "
                                               "subjects it needs, anonymous connections refused (credentials under DATA/auth); "
                                               "--no-nats-auth for debugging.")] = True,  # fmt: skip
) -> None:
    """Start NATS and every tierflow service locally; stop them all on Ctrl-C."""
    if actuator not in ACTUATORS:
        raise typer.BadParameter(f"must be one of {', '.join(ACTUATORS)}, not {actuator!r}", param_hint="--actuator")
    config = UpConfig(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        registry_grpc_port=registry_grpc_port,
        nats_port=nats_port,
        nats_monitor_port=nats_monitor_port,
        data_dir=data_dir,
        fleet=fleet,
        decode_nodes=decode_nodes,
        prefill_nodes=prefill_nodes,
        deployment=deployment,
        metrics_base_port=metrics_base_port,
        ready_timeout=ready_timeout,
        actuator=actuator,
        profiles=profiles,
        nats_cluster=nats_cluster,
        nats_cluster_port=nats_cluster_port,
        routers=routers,
        restart=restart,
        allow_anonymous=allow_anonymous,
        tls=tls,
        nats_auth=nats_auth_on,
    )
    problems = preflight(config)
    if problems:
        for problem in problems:
            typer.echo(f"tierflow up: {problem}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(_run(_main(config)))
