"""Deployed configurations authenticate (issue 15): no open tenant, no unauthenticated admin,
and in compose each process holds its own NATS identity and nothing else.

Options are read as the CLI resolves them (flags, TIERFLOW_* variables, defaults), so an
opt-in given any way (`--allow-anonymous`, `TIERFLOW_ALLOW_ANONYMOUS=1`, a changed
default) is caught.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    DEPLOY,
    command_params,
    compose_argv,
    compose_tierflow_containers,
    compose_tierflow_services,
    container_env,
    k8s_documents,
    load_compose,
    option_value,
    pod_spec,
    run_init_secrets,
)

from tierflow.runtime import nats_auth
from tierflow.runtime.secret_hash import SaltedHash

# Options that open a deployed service to anyone: for local runs only (`tierflow up`).
OPT_INS = {"router": ("allow_anonymous",), "model-registry": ("allow_unauthenticated_admin",)}
CREDS_PATH = "/run/secrets/nats.creds"


def _deployed_commands() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, argv, env) of every tierflow service container in compose and Kubernetes."""
    compose = load_compose()
    out = [(f"compose {name}", compose_argv(svc), {k: str(v) for k, v in (svc.get("environment") or {}).items()})
           for name, svc in compose_tierflow_services(compose).items()]  # fmt: skip
    for _, doc in k8s_documents():
        for container in (pod_spec(doc) or {}).get("containers", []):
            if container["image"].startswith("tierflow"):
                out.append((f"k8s {doc['metadata']['name']}", [str(a) for a in container["args"]], container_env(container)))
    return out


DEPLOYED = _deployed_commands()


@pytest.mark.parametrize(("where", "argv", "env"), DEPLOYED, ids=[where for where, _, _ in DEPLOYED])
def test_no_deployed_service_opts_out_of_authentication(where: str, argv: list[str], env: dict[str, str]) -> None:
    params = command_params(argv, env)
    for option in OPT_INS.get(argv[0], ()):
        assert option in params, f"`tierflow {argv[0]}` has no option {option}: update OPT_INS"
        assert params[option] is False, f"{where} sets {option}: an open deployment"
    if argv[0] == "router":
        assert params["config"], f"{where}: a router without tenants refuses every request; give it --config"
    if argv[0] == "model-registry":
        assert params["admin_token_file"] or params["admin_token_hash"], f"{where}: no admin credential (no one could Apply)"
        assert not params["admin_token"], f"{where}: give the registry a file or a hash, not the token in its environment"


def test_the_open_tenant_check_catches_each_way_of_opting_in() -> None:
    base = ["router", "--config", "/etc/tierflow/router.yaml"]
    assert command_params([*base, "--allow-anonymous"])["allow_anonymous"] is True
    assert command_params(base, {"TIERFLOW_ALLOW_ANONYMOUS": "true"})["allow_anonymous"] is True
    assert command_params(base)["allow_anonymous"] is False


# --------------------------------------------------------------------------- compose: NATS identities


def _compose_identity(name: str, svc: dict[str, Any]) -> nats_auth.Identity:
    """The identity a compose service must hold: by the service it runs and its id flags."""
    argv = compose_argv(svc)
    role = {"router": nats_auth.ROUTER, "model-registry": nats_auth.REGISTRY, "autoscaler": nats_auth.AUTOSCALER,
            "decode-node": nats_auth.NODE, "prefill-node": nats_auth.NODE}.get(argv[0], nats_auth.ADMIN)  # fmt: skip
    if role == nats_auth.ROUTER:
        return nats_auth.Identity(role, option_value(argv, "--router-id") or "")
    if role == nats_auth.NODE:
        return nats_auth.Identity(role, option_value(argv, "--node-id") or "")
    return nats_auth.Identity(role)


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to deploy/) of a service's bind mounts."""
    return {m.split(":")[1]: m.split(":")[0] for m in svc.get("volumes", []) if m.startswith("./")}


def test_each_compose_process_mounts_its_own_nats_identity_only() -> None:
    compose = load_compose()
    seen: dict[str, str] = {}
    for name, svc in compose_tierflow_containers(compose).items():
        if "entrypoint" in svc:
            continue  # secrets-init makes them
        env = svc.get("environment") or {}
        assert env.get(nats_auth.CREDS_ENV) == CREDS_PATH, f"{name}: {nats_auth.CREDS_ENV}"
        identity = _compose_identity(name, svc)
        mounted = _mounts(svc)
        assert mounted.get(CREDS_PATH) == f"./secrets/nats/{identity.name}.creds", f"{name} must hold {identity.name}'s credentials"
        creds = [host for host in mounted.values() if host.endswith(".creds")]
        assert creds == [mounted[CREDS_PATH]], f"{name} sees other identities' credentials: {creds}"
        assert identity.name not in seen, f"{name} and {seen.get(identity.name)} share the identity {identity.name}"
        seen[identity.name] = name
    assert seen.get("admin") == "cli", "the CLI service is the admin identity; no service is"
    for name, svc in compose["services"].items():
        if str(svc.get("image", "")).startswith("nats:"):
            assert _mounts(svc).get("/etc/nats/nats-auth.conf") == "./secrets/nats/nats-auth.conf", name


@pytest.fixture
def made(init_secrets: Path) -> Path:
    return init_secrets


def test_secrets_init_makes_every_identity_compose_mounts(made: Path) -> None:
    """What secrets-init runs (`tierflow nats-auth generate`, its defaults) covers every
    file compose mounts from secrets/, each 0600 and holding the identity it is mounted as."""
    compose = load_compose()
    for name, svc in compose_tierflow_containers(compose).items():
        for host in _mounts(svc).values():
            if host.startswith("./secrets/nats/"):
                made_file = made / "nats" / host.removeprefix("./secrets/nats/")
                assert made_file.is_file(), f"{name} mounts {host}, which `tierflow nats-auth generate` does not make"
                assert stat.S_IMODE(made_file.stat().st_mode) == 0o600
                if made_file.suffix == ".creds":
                    assert nats_auth.read_creds(made_file).identity == _compose_identity(name, svc)
            elif host.startswith("./secrets/"):
                assert (made / host.removeprefix("./secrets/")).is_file(), f"{name} mounts {host}, which init-secrets.sh does not make"


def test_secrets_init_runs_the_script_it_mounts() -> None:
    init = load_compose()["services"]["secrets-init"]
    mounts = _mounts(init)
    script = init["entrypoint"][-1]
    assert mounts[script] == "./init-secrets.sh" and (DEPLOY / "init-secrets.sh").is_file()
    assert mounts[init["command"][0]] == "./secrets"
    named = {m.split(":")[1]: m.split(":")[0] for m in init["volumes"] if not m.startswith("./")}
    nats_volumes = {m.split(":")[0] for name, svc in load_compose()["services"].items()
                    if str(svc.get("image", "")).startswith("nats:") for m in svc["volumes"] if m.endswith(":/data")}  # fmt: skip
    assert set(named.values()) == nats_volumes and set(init["command"][1:]) == set(named), "it chowns every NATS data volume"
    for name, svc in load_compose()["services"].items():
        if name != "secrets-init" and any(h.startswith("./secrets/") for h in _mounts(svc).values()):
            assert svc["depends_on"]["secrets-init"] == {"condition": "service_completed_successfully"}, name


def test_the_kubernetes_router_reads_its_tenants_from_a_secret() -> None:
    router = next(doc for _, doc in k8s_documents() if pod_spec(doc) is not None and doc["metadata"]["name"] == "router")
    spec = pod_spec(router)
    assert spec is not None
    container = spec["containers"][0]
    config = option_value([str(a) for a in container["args"]], "--config") or ""
    mount = next(m for m in container["volumeMounts"] if config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["secret"]["secretName"] == "router-tenants"
    kz = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    gen = next(g for g in kz["secretGenerator"] if g["name"] == "router-tenants")
    assert any(f.startswith(os.path.basename(config) + "=") for f in gen["files"])


def test_the_kubernetes_registry_holds_only_the_admin_tokens_hash() -> None:
    registry = next(doc for _, doc in k8s_documents() if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "model-registry")
    env = {e["name"]: e for e in pod_spec(registry)["containers"][0]["env"]}  # type: ignore[index]
    ref = env["TIERFLOW_ADMIN_TOKEN_HASH"]["valueFrom"]["secretKeyRef"]
    kz = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    gen = next(g for g in kz["secretGenerator"] if g["name"] == ref["name"])
    assert gen["files"] == [f"{ref['key']}=secrets/admin-token.hash"]
    assert "TIERFLOW_ADMIN_TOKEN" not in env and "--admin-token-file" not in pod_spec(registry)["containers"][0]["args"]  # type: ignore[index]


# --------------------------------------------------------------------------- init-secrets.sh


def test_init_secrets_makes_a_working_key_once_and_keeps_it(made: Path) -> None:
    """What secrets-init leaves: tenants the router accepts, holding only the key's salted
    hash; the key once, readable by the directory's owner; a second run changes nothing."""
    from tierflow.services.router.config import load_router_config

    secrets = made
    key = (secrets / "api-key").read_text().strip()
    tenants = (secrets / "router.yaml").read_text()
    assert key and key not in tenants, "the tenants file holds the key's hash, never the key"
    assert stat.S_IMODE((secrets / "api-key").stat().st_mode) == 0o600
    config = load_router_config(str(secrets / "router.yaml"))
    tenant = config.tenants.authenticate(key)
    assert tenant is not None and tenant.name == "default"
    assert config.tenants.authenticate("sk-wrong") is None and config.tenants.authenticate(None) is None
    token = (secrets / "admin.token").read_text().strip()
    assert stat.S_IMODE((secrets / "admin.token").stat().st_mode) == 0o600
    assert SaltedHash.parse((secrets / "admin-token.hash").read_text().strip()).matches(token)
    if os.geteuid() == 0:  # secrets-init runs as root: what the containers read becomes their uid's
        owned = [p for p in (secrets / "nats").iterdir() if p.suffix in (".creds", ".conf")] + [secrets / "admin.token"]
        assert {p.stat().st_uid for p in owned} == {10001}
    second = run_init_secrets(secrets)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (secrets / "api-key").read_text().strip() == key and (secrets / "router.yaml").read_text() == tenants
    assert (secrets / "admin.token").read_text().strip() == token
