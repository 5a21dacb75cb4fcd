"""`tierflow apply | models | deployments | bundles | rollout | promote | rollback`: the
model registry's admin API (tierflow.v1.ModelRegistry) from the command line.

Every command is one gRPC call over a real channel to the registry named by
`--registry HOST:PORT` (or TIERFLOW_REGISTRY); the registry does all validation, so the
CLI and any other client are refused with the same messages. Exit codes: 0 done,
1 refused (invalid file, unknown model, conflict, missing admin credential, ...), 2 the
registry is unreachable.

Calls that write need the registry's admin token: `--admin-token` (or TIERFLOW_ADMIN_TOKEN),
else the one `tierflow up` keeps in DATA/auth/admin.token (DATA: TIERFLOW_DATA_DIR or
.tierflow). Every call sends it when there is one, with `user@host` for the audit record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tierflow.v1 import registry_pb2 as pb
    from tierflow.v1.registry_pb2_grpc import ModelRegistryStub

__all__ = ["add_registry_commands", "format_changes"]

DEFAULT_REGISTRY = "127.0.0.1:50052"
TIMEOUT = 15.0
T = TypeVar("T")

Registry = Annotated[str, typer.Option("--registry", envvar="TIERFLOW_REGISTRY", help="The model registry's gRPC address, HOST:PORT.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ExpectedRevision = Annotated[int, typer.Option(help="Refuse unless the model is still at this revision (0: no check).")]
AdminToken = Annotated[str, typer.Option("--admin-token", envvar="TIERFLOW_ADMIN_TOKEN", show_default=False,
                                         help="The registry's admin token (default: DATA/auth/admin.token of `tierflow up`).")]  # fmt: skip

_out = Console(soft_wrap=True, highlight=False)
_err = Console(stderr=True, soft_wrap=True, highlight=False)


# --------------------------------------------------------------------------- the client


def _fail(message: str, code: int) -> NoReturn:
    _err.print(message, markup=False)
    raise typer.Exit(code)


@contextmanager
def _registry(target: str, admin_token: str = "") -> Iterator[Callable[[Callable[[ModelRegistryStub], T]], T]]:
    """A caller of stub methods that turns gRPC failures into one clear line and an exit code."""
    import os

    import grpc

    from tierflow.cli.client_tls import DATA_DIR_ENV, DEFAULT_DATA_DIR, cli_tls
    from tierflow.runtime.admin_token import TOKEN_ENV, find_admin_token, with_admin_metadata
    from tierflow.runtime.tls import TlsError, grpc_channel_credentials
    from tierflow.v1.registry_pb2_grpc import ModelRegistryStub

    tls = cli_tls()  # a `tierflow up --tls` fabric, or --tls-ca: the registry must prove itself
    try:
        channel = grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, grpc_channel_credentials(tls))
    except (TlsError, OSError) as exc:
        _fail(f"cannot use the TLS files ({exc}); check --tls-ca or TIERFLOW_TLS_CA", 2)
    token = find_admin_token(admin_token or os.environ.get(TOKEN_ENV, ""), Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR))
    channel = with_admin_metadata(channel, token)
    with channel:
        stub = ModelRegistryStub(channel)

        def call(fn: Callable[[ModelRegistryStub], T]) -> T:
            try:
                return fn(stub)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    _fail(
                        f"cannot reach the model registry at {target} ({details}); is the fabric up (`make up`)?"
                        " Point at another with --registry HOST:PORT or TIERFLOW_REGISTRY.",
                        2,
                    )
                _fail(f"refused ({code.name}): {details}", 1)

        yield call


# --------------------------------------------------------------------------- output


def _value(text: str) -> str:
    return text if text else "(none)"


def format_changes(changes: list[pb.Change]) -> list[str]:
    """The diff as a person reads it: `+ kind name`, `~ kind name` with `field: old -> new`, `- kind name`."""
    lines = []
    for c in changes:
        if c.op == "create":
            lines.append(f"+ {c.kind} {c.name}")
        elif c.op == "delete":
            lines.append(f"- {c.kind} {c.name}")
        elif c.op == "update":
            lines.append(f"~ {c.kind} {c.name}")
            lines += [f"    {f.field}: {_value(f.old_json)} -> {_value(f.new_json)}" for f in c.fields]
    return lines


_STYLES = {"+": "green", "-": "red", "~": "yellow"}


def _summary(changes: list[pb.Change], dry_run: bool) -> str:
    count = {op: sum(c.op == op for c in changes) for op in ("create", "update", "delete", "unchanged")}
    text = f"{count['create']} created, {count['update']} changed, {count['delete']} deleted, {count['unchanged']} unchanged"
    return f"dry run, nothing written: would be {text}" if dry_run else f"applied: {text}"


def _traffic(model: pb.Model) -> str:
    if not model.traffic:
        return f"{model.default_version} 100%"
    total = sum(t.weight for t in model.traffic if t.weight > 0) or 1.0
    return ", ".join(f"{t.version} {t.weight * 100 / total:g}%" for t in model.traffic if t.weight > 0)


def _as_dicts(messages: Any) -> list[dict[str, Any]]:
    from google.protobuf.json_format import MessageToDict

    return [MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True) for m in messages]


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _model_line(model: pb.Model, verb: str) -> None:
    _out.print(f"{model.name}: {verb}; traffic {_traffic(model)} (default {model.default_version}, revision {model.revision})", markup=False)


# --------------------------------------------------------------------------- commands


def apply(
    file: Annotated[Path, typer.Option("--file", "-f", help="The fleet file (YAML).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and show the diff; write nothing.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Also delete what the registry holds and the file does not.")] = False,
    registry: Registry = DEFAULT_REGISTRY,
    admin_token: AdminToken = "",
) -> None:
    """Apply a fleet file: print the diff it makes; every problem (and nothing written) if invalid."""
    from tierflow.v1 import registry_pb2 as pb

    try:
        text = file.read_text()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror}", 1)
    with _registry(registry, admin_token) as call:
        reply = call(lambda s: s.Apply(pb.ApplyRequest(fleet_yaml=text, dry_run=dry_run, prune=prune, source=str(file)), timeout=TIMEOUT))
    if reply.problems:
        _err.print(f"{file} is invalid; nothing was applied ({len(reply.problems)} problem{'s' if len(reply.problems) != 1 else ''}):", markup=False)
        for problem in reply.problems:
            _err.print(f"  - {problem}", markup=False)
        raise typer.Exit(1)
    for line in format_changes(list(reply.changes)):
        _out.print(line, markup=False, style=_STYLES.get(line[:1]))
    _out.print(_summary(list(reply.changes), reply.dry_run), markup=False)


def models_list(registry: Registry = DEFAULT_REGISTRY, json_out: JsonOut = False) -> None:
    """Models, their versions, default version and traffic split."""
    from tierflow.v1 import registry_pb2 as pb

    with _registry(registry) as call:
        models = call(lambda s: s.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)).models
    if json_out:
        _print_json(_as_dicts(models))
        return
    table = Table(title="models")
    for col in ("model", "versions", "default", "traffic", "revision", "description"):
        table.add_column(col)
    for m in models:
        table.add_row(m.name, ", ".join(v.version for v in m.versions), m.default_version, _traffic(m), str(m.revision), m.description)
    _out.print(table)


def deployments_list(registry: Registry = DEFAULT_REGISTRY, json_out: JsonOut = False) -> None:
    """Deployments: bundle, models (version, config), workload, mode and replicas."""
    from tierflow.v1 import registry_pb2 as pb

    with _registry(registry) as call:
        deployments = call(lambda s: s.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)).deployments
    if json_out:
        _print_json(_as_dicts(deployments))
        return
    table = Table(title="deployments")
    for col in ("deployment", "bundle", "models", "workload", "mode", "replicas (min..max)", "prefill", "region", "residency", "profile"):
        table.add_column(col)
    for d in deployments:
        models = ", ".join(f"{e.model}@{e.version} {e.config}" for e in d.models)
        table.add_row(d.name, d.bundle, models, d.workload, d.mode, f"{d.replicas} ({d.min_replicas}..{d.max_replicas})",
                      str(d.prefill_replicas), d.region, d.residency or "-", d.profile)  # fmt: skip
    _out.print(table)


def bundles_list(registry: Registry = DEFAULT_REGISTRY, json_out: JsonOut = False) -> None:
    """Bundle templates: which models (versions, configs) share a node."""
    from tierflow.v1 import registry_pb2 as pb

    with _registry(registry) as call:
        bundles = call(lambda s: s.ListBundles(pb.ListBundlesRequest(), timeout=TIMEOUT)).bundles
    if json_out:
        _print_json(_as_dicts(bundles))
        return
    table = Table(title="bundles")
    for col in ("bundle", "models", "revision"):
        table.add_column(col)
    for b in bundles:
        table.add_row(b.name, ", ".join(f"{e.model}@{e.version} {e.config}" for e in b.models), str(b.revision))
    _out.print(table)


def rollout(
    model: Annotated[str, typer.Argument(help="The model, as API clients name it.")],
    version: Annotated[str, typer.Option("--version", help="The version to send traffic to.")],
    weight: Annotated[float, typer.Option("--weight", help="Percent of traffic for it, 0..100 (100: blue-green cut-over, 0: stop).")],
    expected_revision: ExpectedRevision = 0,
    registry: Registry = DEFAULT_REGISTRY,
    admin_token: AdminToken = "",
) -> None:
    """Canary a version: it gets WEIGHT% of the model's traffic, the default version the rest."""
    from tierflow.v1 import registry_pb2 as pb

    request = pb.RolloutRequest(model=model, version=version, weight=weight, expected_revision=expected_revision)
    with _registry(registry, admin_token) as call:
        reply = call(lambda s: s.Rollout(request, timeout=TIMEOUT))
    _model_line(reply, f"rolled out {version} at {weight:g}%")


def promote(
    model: Annotated[str, typer.Argument(help="The model, as API clients name it.")],
    version: Annotated[str, typer.Option("--version", help="The version to make the default.")],
    expected_revision: ExpectedRevision = 0,
    registry: Registry = DEFAULT_REGISTRY,
    admin_token: AdminToken = "",
) -> None:
    """Make a version the default (stable) one and end any traffic split."""
    from tierflow.v1 import registry_pb2 as pb

    request = pb.PromoteRequest(model=model, version=version, expected_revision=expected_revision)
    with _registry(registry, admin_token) as call:
        reply = call(lambda s: s.Promote(request, timeout=TIMEOUT))
    _model_line(reply, f"promoted {version}")


def rollback(
    model: Annotated[str, typer.Argument(help="The model, as API clients name it.")],
    expected_revision: ExpectedRevision = 0,
    registry: Registry = DEFAULT_REGISTRY,
    admin_token: AdminToken = "",
) -> None:
    """End any traffic split: all traffic back to the default version, at once."""
    from tierflow.v1 import registry_pb2 as pb

    request = pb.RollbackRequest(model=model, expected_revision=expected_revision)
    with _registry(registry, admin_token) as call:
        reply = call(lambda s: s.Rollback(request, timeout=TIMEOUT))
    _model_line(reply, "rolled back")


def _group(name: str, help: str, list_command: Callable[..., None]) -> typer.Typer:
    group = typer.Typer(help=help, no_args_is_help=True, add_completion=False, rich_markup_mode=None)
    group.command("list")(list_command)
    return group


def add_registry_commands(app: typer.Typer) -> None:
    panel = "Registry"
    app.command("apply", rich_help_panel=panel)(apply)
    app.command("rollout", rich_help_panel=panel)(rollout)
    app.command("promote", rich_help_panel=panel)(promote)
    app.command("rollback", rich_help_panel=panel)(rollback)
    app.add_typer(_group("models", "Registered models.", models_list), name="models", rich_help_panel=panel)
    app.add_typer(_group("deployments", "Bundle deployments.", deployments_list), name="deployments", rich_help_panel=panel)
    app.add_typer(_group("bundles", "Bundle templates.", bundles_list), name="bundles", rich_help_panel=panel)
