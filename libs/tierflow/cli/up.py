"""`tierflow up`: the whole fabric on one machine, as real processes.

Why processes and not tasks in one interpreter: the services share nothing but NATS in
production, and running them the same way locally is what makes kill-and-restart,
per-service logs and metrics behave like the real thing.

Sequence: preflight (ports free, fleet file present, nats-server found) -> nats-server
with JetStream under DATA/nats -> model-registry, router, autoscaler, prefill and decode
nodes, each `python -m tierflow <service> ...` -> poll the router's `/health` until it
reports enough nodes and at least one model -> print one "is up" line -> run until
Ctrl-C / SIGTERM -> stop services, then NATS -> exit 0.

If a child dies before the fabric is ready, or the ready timeout passes: report it with
its log tail, stop everything, exit 1. After ready, losing NATS, the router or the
registry is fatal the same way; losing a node or the autoscaler is reported and the rest
keeps running (the fabric is built to survive that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from tierflow.cli.supervisor import ChildExit, ProcessSpec, Supervisor
from tierflow.runtime.nats_server import (
    NatsServerConfig,
    NatsServerNotFound,
    NatsServerNotReady,
    connect_host,
    http_get,
    wait_until_ready,
)

__all__ = ["ESSENTIAL", "UpConfig", "preflight", "run_up", "service_specs", "up"]

NATS_NAME = "nats"
# Children whose loss makes the fabric useless; anything else is reported and tolerated.
ESSENTIAL = frozenset({NATS_NAME, "router", "model-registry"})
STOP_GRACE = 5.0
HEALTH_POLL_INTERVAL = 0.25
# Extra environment for services: unbuffered so log files (and death reports) are current.
SERVICE_ENV = {"PYTHONUNBUFFERED": "1"}


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

    def __post_init__(self) -> None:
        if self.decode_nodes < 1:
            raise ValueError("at least one decode node is needed")
        if self.prefill_nodes < 0:
            raise ValueError("prefill node count cannot be negative")
        if self.ready_timeout <= 0:
            raise ValueError("ready timeout must be positive")

    @property
    def logs_dir(self) -> Path:
        """DATA/logs: one `<child>.log` per process."""
        return self.data_dir / "logs"

    def nats(self) -> NatsServerConfig:
        """The NATS server this fabric runs (store under DATA/nats)."""
        return NatsServerConfig(
            store_dir=self.data_dir / "nats",
            host=self.host,
            port=self.nats_port,
            monitor_port=self.nats_monitor_port,
            name="tierflow",
        )

    def ready_line(self) -> str:
        """The single line printed once the fabric answers."""
        return (
            f"tierflow is up: OpenAI http://{self.host}:{self.http_port}/v1  "
            f"gRPC {self.host}:{self.grpc_port}  registry {self.host}:{self.registry_grpc_port}  "
            f"NATS {self.nats().url}  (logs: {self.logs_dir})"
        )


def service_specs(config: UpConfig, *, python: str = sys.executable) -> list[ProcessSpec]:
    """The services to start, in start order, with exactly the flags of the service contract.

    Each non-router service gets the next metrics port from `metrics_base_port`, in this
    order; the router serves /metrics on its HTTP port (`--metrics-port 0`).
    """
    nats_url = config.nats().url
    metrics = iter(range(config.metrics_base_port, 65536))
    fleet = str(config.fleet.resolve())

    def spec(name: str, *args: str) -> ProcessSpec:
        return ProcessSpec(name, [python, "-m", "tierflow", *args], dict(SERVICE_ENV), config.logs_dir / f"{name}.log")

    specs = [
        spec("model-registry", "model-registry", "--nats-url", nats_url, "--grpc-port", str(config.registry_grpc_port),
             "--fleet", fleet, "--metrics-port", str(next(metrics))),
        spec("router", "router", "--nats-url", nats_url, "--http-host", config.host, "--http-port", str(config.http_port),
             "--grpc-port", str(config.grpc_port), "--metrics-port", "0"),
        spec("autoscaler", "autoscaler", "--nats-url", nats_url, "--metrics-port", str(next(metrics))),
    ]  # fmt: skip
    for i in range(config.prefill_nodes):
        specs.append(spec(f"prefill-{i}", "prefill-node", "--nats-url", nats_url, "--node-id", f"prefill-{i}",
                          "--metrics-port", str(next(metrics))))  # fmt: skip
    for i in range(config.decode_nodes):
        specs.append(spec(f"decode-{i}", "decode-node", "--nats-url", nats_url, "--node-id", f"decode-{i}",
                          "--deployment", config.deployment, "--metrics-port", str(next(metrics))))  # fmt: skip
    return specs


def _listen_ports(config: UpConfig) -> list[tuple[str, int]]:
    """Every TCP port the fabric will listen on, labelled for error messages."""
    ports = [
        ("router HTTP (--http-port)", config.http_port),
        ("router gRPC (--grpc-port)", config.grpc_port),
        ("registry gRPC (--registry-grpc-port)", config.registry_grpc_port),
        ("NATS (--nats-port)", config.nats_port),
        ("NATS monitoring (--nats-monitor-port)", config.nats_monitor_port),
    ]
    n_metrics = 2 + config.prefill_nodes + config.decode_nodes
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
    try:
        config.nats().argv()
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


async def _wait_fabric_ready(config: UpConfig, deadline: float) -> None:
    """Poll the router's GET /health until it is 200 {"status": "ok"} with enough nodes and a model."""
    loop = asyncio.get_running_loop()
    host = connect_host(config.host)
    last = "no answer yet"
    while True:
        timeout = max(0.05, min(1.0, deadline - loop.time()))
        try:
            reply = await http_get(host, config.http_port, "/health", timeout=timeout)
            last = f"HTTP {reply.status} {reply.body[:300].decode('utf-8', 'replace')}"
            if reply.status == 200:
                body = json.loads(reply.body)
                if (
                    isinstance(body, dict)
                    and body.get("status") == "ok"
                    and _count(body.get("nodes")) >= config.decode_nodes
                    and _count(body.get("models")) >= 1
                ):
                    return
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except ValueError:
            pass  # not JSON yet; `last` already holds the raw answer
        if loop.time() >= deadline:
            raise FabricNotReady(
                f"router /health at http://{host}:{config.http_port}/health not ready "
                f"(need status ok, nodes >= {config.decode_nodes}, models >= 1); last answer: {last}"
            )
        await asyncio.sleep(HEALTH_POLL_INTERVAL)


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


async def _shutdown(supervisor: Supervisor, grace: float) -> None:
    """Services concurrently first, then NATS: services drain their NATS connections while it is up."""
    services = [child.name for child in supervisor.children if child.name != NATS_NAME]
    await supervisor.stop(*services, grace=grace)
    await supervisor.stop_all(grace=grace)


async def run_up(
    config: UpConfig,
    stop: asyncio.Event,
    *,
    specs: list[ProcessSpec] | None = None,
    supervisor: Supervisor | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    grace: float = STOP_GRACE,
) -> int:
    """Run the fabric until `stop` is set (returns 0) or something fatal happens (returns 1).

    `specs` replaces the services (tests pass small fakes); NATS is always real.
    `supervisor` lets the caller reach the children (e.g. to kill them on a second
    Ctrl-C). Every child is stopped before this returns, whatever happened.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.ready_timeout
    nats = config.nats()
    try:
        nats_argv = nats.argv()
    except NatsServerNotFound as exc:
        print(f"tierflow up: {exc}", file=err)
        return 1
    services = service_specs(config) if specs is None else specs
    nats.store_dir.mkdir(parents=True, exist_ok=True)

    supervisor = supervisor if supervisor is not None else Supervisor()
    exit_task: asyncio.Future[ChildExit] = asyncio.ensure_future(supervisor.next_exit())
    stop_task = asyncio.ensure_future(stop.wait())

    def died(prefix: str) -> int:
        print(f"tierflow up: {prefix}{exit_task.result().describe()}", file=err)
        print("tierflow up: stopping everything", file=err)
        return 1

    try:
        await supervisor.start(ProcessSpec(NATS_NAME, nats_argv, None, config.logs_dir / f"{NATS_NAME}.log"))
        try:
            outcome = await _race(wait_until_ready(nats, max(0.1, deadline - loop.time())), exit_task, stop_task)
        except NatsServerNotReady as exc:
            print(f"tierflow up: {exc}\n{_tails(supervisor, 20)}", file=err)
            return 1
        if outcome == "exit":
            return died("before the fabric was ready, ")
        if outcome == "stop":
            return 0

        for spec in services:
            try:
                await supervisor.start(spec)
            except OSError as exc:
                print(f"tierflow up: cannot start {spec.name} ({spec.argv[0]}): {exc}", file=err)
                return 1
        try:
            outcome = await _race(_wait_fabric_ready(config, deadline), exit_task, stop_task)
        except FabricNotReady as exc:
            print(f"tierflow up: not ready after {config.ready_timeout:g}s: {exc}\n{_tails(supervisor)}", file=err)
            return 1
        if outcome == "exit":
            return died("before the fabric was ready, ")
        if outcome == "stop":
            return 0

        print(config.ready_line(), file=out, flush=True)
        while True:
            await asyncio.wait({exit_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if exit_task.done():
                event = exit_task.result()
                if event.name in ESSENTIAL:
                    return died("")
                print(f"tierflow up: {event.describe()}\ntierflow up: the rest keeps running", file=err)
                exit_task = asyncio.ensure_future(supervisor.next_exit())
                continue
            return 0
    finally:
        for task in (exit_task, stop_task):
            task.cancel()
        await _shutdown(supervisor, grace)


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
    try:
        return await run_up(config, stop, supervisor=supervisor)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


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
    nats_port: Annotated[int, typer.Option(help="NATS client port.")] = 4222,
    nats_monitor_port: Annotated[int, typer.Option(help="NATS monitoring port (/healthz).")] = 8222,
    data_dir: Annotated[Path, typer.Option(help="NATS store under DATA/nats, logs under DATA/logs.")] = Path(".tierflow"),
    fleet: Annotated[Path, typer.Option(help="Fleet file loaded by the model registry.")] = Path("deploy/examples/fleet.yaml"),
    decode_nodes: Annotated[int, typer.Option(min=1, help="Decode nodes to start.")] = 2,
    prefill_nodes: Annotated[int, typer.Option(min=0, help="Prefill nodes to start.")] = 1,
    deployment: Annotated[str, typer.Option(help="Bundle deployment the decode nodes serve.")] = "default",
    metrics_base_port: Annotated[int, typer.Option(help="First /metrics port; each non-router service takes the next.")] = 9100,
    ready_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the fabric to answer /health.")] = 60.0,
) -> None:
    """Start NATS and every tierflow service locally; stop them all on Ctrl-C."""
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
    )
    problems = preflight(config)
    if problems:
        for problem in problems:
            typer.echo(f"tierflow up: {problem}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(_run(_main(config)))
