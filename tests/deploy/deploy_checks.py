"""Helpers for tests/deploy/test_deploy_*.py: read the deployment files, check tierflow commands.

The main question: is a container's command a valid `tierflow` command?

Compose and Kubernetes both run the one image whose ENTRYPOINT is `tierflow`; what they
add is `<service> --flags` (and TIERFLOW_* environment variables). A typo there only
shows when a container starts, so these checks parse every such command with the CLI's
own parser (built by typer from each service's Settings) and then validate the
values with msgspec exactly as `tierflow <service>` does before it runs anything.
"""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from typing import Any
from pathlib import Path
from unittest import mock

import msgspec
import typer
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# Options the CLI adds to every service on top of its Settings fields.
_RUNTIME_OPTIONS = ("metrics_port", "log_level")


def tierflow_command_problems(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Why `tierflow *argv` (with TIERFLOW_* variables `env`) would be refused; [] if it would start.

    `argv` is what follows `tierflow` (the service name first). Variables of `env` that
    are not TIERFLOW_* are ignored; unknown TIERFLOW_* names are problems, since the CLI
    would silently ignore them.
    """
    from tierflow.cli.main import app
    from tierflow.cli.services import SERVICES

    if not argv:
        return ["empty command: expected `<service> --flags`"]
    service, args = argv[0], argv[1:]
    if service not in SERVICES:
        return [f"{service!r} is not a tierflow service (one of {', '.join(SERVICES)})"]
    command = typer.main.get_command(app).commands[service]  # type: ignore[attr-defined]
    from tierflow.runtime.nats_auth import CREDS_ENV

    ours = {k: v for k, v in (env or {}).items() if k.startswith("TIERFLOW_")}
    # Options are TIERFLOW_* variables too; so is the one the runtime reads for every
    # service, the NATS credentials file (read where the connection is made, not a flag).
    known = {p.envvar for p in command.params if isinstance(p.envvar, str)} | {CREDS_ENV}
    problems = [f"{service}: environment variable {name} is not an option of `tierflow {service}`" for name in sorted(set(ours) - known)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TIERFLOW_")}
    try:
        with mock.patch.dict(os.environ, {**clean, **ours}, clear=True):
            ctx = command.make_context(service, list(args))
    except typer.TyperException as exc:  # click's usage errors, as typer re-exports them
        return [*problems, f"`tierflow {' '.join(argv)}`: {exc.format_message()}"]
    values = {k: v for k, v in ctx.params.items() if k not in _RUNTIME_OPTIONS}
    settings_cls = importlib.import_module(f"{SERVICES[service]}.settings").Settings
    try:
        msgspec.convert(values, settings_cls)
    except msgspec.ValidationError as exc:
        problems.append(f"`tierflow {' '.join(argv)}`: {exc}")
    return problems


def command_params(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Every option of `tierflow *argv` as the CLI resolves it (flags, then TIERFLOW_*
    variables of `env`, then defaults), by Settings field name. For asking what a deployed
    container really runs with, whichever way an option was given."""
    from tierflow.cli.main import app

    command = typer.main.get_command(app).commands[argv[0]]  # type: ignore[attr-defined]
    ours = {k: v for k, v in (env or {}).items() if k.startswith("TIERFLOW_")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TIERFLOW_")}
    with mock.patch.dict(os.environ, {**clean, **ours}, clear=True):
        return dict(command.make_context(argv[0], list(argv[1:])).params)


def option_value(argv: list[str], flag: str) -> str | None:
    """The value given to `flag` in argv (`--flag value` or `--flag=value`), else None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- files

TIERFLOW_IMAGE = "tierflow"


def load_compose() -> dict[str, Any]:
    """deploy/docker-compose.yml as data (PyYAML resolves the `<<: *anchor` merges)."""
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_tierflow_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run a tierflow service from the tierflow image: not the
    one-shot ones with their own entrypoint (secrets-init) nor the tools that `up` does not
    start (those under `profiles`, e.g. cli)."""
    return {name: svc for name, svc in compose_tierflow_containers(compose).items() if "entrypoint" not in svc and "profiles" not in svc}


def compose_tierflow_containers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every compose service that runs the tierflow image, one-shot and tools included."""
    return {name: svc for name, svc in compose["services"].items() if str(svc.get("image", "")).split(":")[0] == TIERFLOW_IMAGE}


def compose_argv(service: dict[str, Any]) -> list[str]:
    """A compose `command` as the argv after the ENTRYPOINT (strings are split like compose does)."""
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/k8s/*.yaml, with the file it came from."""
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template's spec of a workload object, None for anything else."""
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


# What a pod's downward-API fields look like when the pod runs (for checking values).
FIELD_PLACEHOLDERS = {"metadata.name": "decode-node-7c9f8d6b5-x2k7q", "metadata.namespace": "tierflow", "status.podIP": "10.0.0.7"}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment, downward-API references replaced by realistic values."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            env[var["name"]] = FIELD_PLACEHOLDERS.get(field, "placeholder")
    return env


def fleet_deployments() -> list[dict[str, Any]]:
    return yaml.safe_load((DEPLOY / "examples" / "fleet.yaml").read_text())["deployments"]


def _pool_max(dep: dict[str, Any], pool: str, manifest_replicas: int) -> int:
    """The most replicas a pool may have: the fleet's bounds (as the autoscaler reads them),
    or the manifest's count for a pool the autoscaler does not scale (a bundle's prefill)."""
    from tierflow.contracts import registry
    from tierflow.scaling.fleet import pool_bounds

    record = registry.DeploymentRecord(name=dep["name"], bundle=dep["bundle"], models=[], replicas=dep.get("replicas", 1),
                                       min_replicas=dep.get("min_replicas", 1), max_replicas=dep.get("max_replicas", 1),
                                       mode=dep.get("mode", "bundle"), prefill_replicas=dep.get("prefill_replicas", 0))  # fmt: skip
    bounds = pool_bounds(record).get(pool)
    return max(manifest_replicas, bounds.max_replicas if bounds else 0)


def node_pools() -> list[tuple[str, dict[str, Any], int, dict[str, Any]]]:
    """(StatefulSet name, StatefulSet, max replicas, fleet deployment) of every fleet deployment's pools."""
    from tierflow.services.autoscaler.kubernetes import kube_name
    from tierflow.services.autoscaler.settings import Settings

    template = Settings().kube_name_template
    sets = {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == "StatefulSet"}
    out = []
    for dep in fleet_deployments():
        for pool in ("decode", "prefill"):
            name = kube_name(template, dep["name"], pool)
            assert name in sets, f"no StatefulSet {name} for pool {pool} of fleet deployment {dep['name']!r}"
            out.append((name, sets[name], _pool_max(dep, pool, sets[name]["spec"]["replicas"]), dep))
    return out


def run_init_secrets(secrets: Path, *, tls: bool = False) -> subprocess.CompletedProcess[str]:
    """deploy/init-secrets.sh SECRETS_DIR, with this environment's `tierflow` on PATH
    (`tls`: with TIERFLOW_TLS=1, as docker-compose.tls.yml runs it)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "TIERFLOW_TLS": "1" if tls else "0"}
    return subprocess.run(["sh", str(DEPLOY / "init-secrets.sh"), str(secrets)], capture_output=True, text=True, timeout=120, env=env)
