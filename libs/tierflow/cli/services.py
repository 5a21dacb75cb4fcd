"""`tierflow <service>` commands, generated from each service's typed Settings.

One place for each fact: a service's configuration is its `Settings` Struct (in the
service's light `settings` module). Each field becomes a `--flag` (snake_case ->
kebab-case) with the field's default and a `TIERFLOW_<FIELD>` environment variable;
msgspec then validates the whole object, so a bad value is refused, naming the flag,
before anything starts. Flags every service has (metrics, log level, `--tls-cert`,
`--tls-key`, `--tls-ca`) are added here once and reach the service through its
`ServiceContext`, not its Settings (a msgspec Struct cannot mix in a second base with
fields, and the autoscaler's Settings already extends the policy's config). The service module itself (grpc, nats, ...) is imported only
when its command runs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import typer

from tierflow.runtime.service import run_service
from tierflow.runtime.tls import TlsError, TlsFiles

__all__ = ["SERVICES", "add_service_commands"]

# command -> package holding `settings.Settings` and `main.main(ctx, settings)`
SERVICES = {
    "router": "tierflow.services.router",
    "model-registry": "tierflow.services.model_registry",
    "autoscaler": "tierflow.services.autoscaler",
    "prefill-node": "tierflow.services.prefill_node",
    "decode-node": "tierflow.services.decode_node",
}
_SCALARS = (int, float, bool, str)
_TLS_FLAGS = {
    "cert": "PEM certificate this service's servers present (HTTP, gRPC) and shows NATS when it asks; with --tls-key",
    "key": "PEM private key of --tls-cert",
    "ca": "PEM CA that servers (NATS, gRPC) must be signed by; without it, the system's trust store",
}


def _scalar(annotation: Any) -> type:
    """The plain type behind Annotated[...] / Optional[...] (typer needs a plain one)."""
    base = annotation
    while typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    if isinstance(base, types.UnionType) or typing.get_origin(base) is typing.Union:
        args = [a for a in typing.get_args(base) if a is not type(None)]
        base = args[0] if len(args) == 1 else str
        while typing.get_origin(base) is typing.Annotated:  # Optional[Annotated[float, Meta(...)]]
            base = typing.get_args(base)[0]
    return base if base in _SCALARS else str


def _command(name: str, package: str) -> Callable[..., None]:
    settings_cls: type[msgspec.Struct] = importlib.import_module(f"{package}.settings").Settings
    hints = typing.get_type_hints(settings_cls, include_extras=True)
    params = []
    for field in msgspec.structs.fields(settings_cls):
        flag = "--" + field.name.replace("_", "-")
        option = typer.Option(flag, envvar=f"TIERFLOW_{field.name.upper()}")
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=Annotated[_scalar(hints[field.name]), option]))
    params.append(inspect.Parameter("metrics_port", inspect.Parameter.KEYWORD_ONLY, default=0,
                                    annotation=Annotated[int, typer.Option(envvar="TIERFLOW_METRICS_PORT", help="Prometheus /metrics port (0: off)")]))
    params.append(inspect.Parameter("metrics_host", inspect.Parameter.KEYWORD_ONLY, default="127.0.0.1",
                                    annotation=Annotated[str, typer.Option(envvar="TIERFLOW_METRICS_HOST", help="Address /metrics listens on (0.0.0.0 in containers)")]))
    params.append(inspect.Parameter("log_level", inspect.Parameter.KEYWORD_ONLY, default="info",
                                    annotation=Annotated[str, typer.Option(envvar="TIERFLOW_LOG_LEVEL")]))
    for part, what in _TLS_FLAGS.items():
        params.append(inspect.Parameter(f"tls_{part}", inspect.Parameter.KEYWORD_ONLY, default="",
                                        annotation=Annotated[str, typer.Option(envvar=f"TIERFLOW_TLS_{part.upper()}", help=what)]))
    if name == "router":
        params.append(inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, default=1, annotation=Annotated[int, typer.Option(
            min=1, help="Router processes sharing the HTTP and gRPC ports (SO_REUSEPORT), as `tierflow up --routers` starts them; "
                        "worker i gets router id ID-i (fresh ids without --router-id) and /metrics on --metrics-port + i")]))

    def run(**values: Any) -> None:
        workers = values.pop("workers", 1)
        if workers > 1:
            raise typer.Exit(_run_workers(workers, values))
        metrics_port = values.pop("metrics_port")
        metrics_host = values.pop("metrics_host")
        log_level = values.pop("log_level")
        try:
            tls = TlsFiles(**{part: values.pop(f"tls_{part}") for part in _TLS_FLAGS}).check()
        except TlsError as exc:
            raise typer.BadParameter(str(exc)) from None
        try:
            settings = msgspec.convert(values, settings_cls)
        except msgspec.ValidationError as exc:
            raise typer.BadParameter(str(exc).replace("`$.", "`--").replace("_", "-")) from None
        main = importlib.import_module(f"{package}.main").main
        instance = str(values.get("node_id") or values.get("router_id") or "")
        run_service(name, lambda ctx: main(ctx, settings), instance=instance, log_level=log_level, metrics_port=metrics_port, metrics_host=metrics_host,
                    tls=tls)  # fmt: skip

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__name__ = name.replace("-", "_")
    run.__doc__ = f"Run the {name} service (one process)."
    return run


def _run_workers(workers: int, values: dict[str, Any]) -> int:
    """`tierflow router --workers N`: N router processes on one port, the way `tierflow up
    --routers N` runs them (each its own `tierflow router --reuse-port`, its own router id
    and metrics port), this process forwarding SIGTERM/SIGINT and stopping all of them
    when one exits (a supervisor then restarts the whole). Each worker is configured by
    the same TIERFLOW_* variables the flags read. Returns the exit code."""
    from tierflow.runtime import nats_auth
    from tierflow.runtime.processes import die_with_parent_preexec

    if os.environ.get(nats_auth.CREDS_ENV):
        raise typer.BadParameter(
            "--workers needs one NATS identity per worker (a router reads only its own reply subjects): use `tierflow up --routers N`, "
            "or run N `tierflow router --reuse-port` processes, each with its own TIERFLOW_NATS_CREDS", param_hint="--workers")
    base = {f"TIERFLOW_{key.upper()}": str(value).lower() if isinstance(value, bool) else str(value) for key, value in values.items()}
    router_id = str(values.get("router_id") or "")
    metrics_port = int(values.get("metrics_port") or 0)
    children = []
    for i in range(workers):
        env = {**os.environ, **base, "TIERFLOW_REUSE_PORT": "true", "TIERFLOW_ROUTER_ID": f"{router_id}-{i}" if router_id else "",
               "TIERFLOW_METRICS_PORT": str(metrics_port + i if metrics_port else 0)}  # fmt: skip
        children.append(subprocess.Popen([sys.executable, "-m", "tierflow", "router"], env=env, preexec_fn=die_with_parent_preexec()))  # noqa: S603

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = 0
    while True:
        exited = [child for child in children if child.poll() is not None]
        if exited:
            code = exited[0].returncode
            forward(signal.SIGTERM, None)
            for child in children:
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
            return code if code >= 0 else 128 - code
        try:  # until a child exits, without reaping it (poll() above does, keeping its code)
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass


def add_service_commands(app: typer.Typer) -> None:
    for name, package in SERVICES.items():
        app.command(name, rich_help_panel="Services")(_command(name, package))
