"""TLS as the deployed configurations turn it on (issue 15): docker-compose.tls.yml over
docker-compose.yml, and the kustomize overlay deploy-tls over deploy/.

Both are rendered by their own tools offline (`docker-compose config`, `kubectl
kustomize`); every tierflow container must then get the three TIERFLOW_TLS_* variables the
services read (their --tls-cert/--tls-key/--tls-ca) pointing at files it mounts, made by
deploy/init-secrets.sh with TIERFLOW_TLS=1, and every NATS server a config that nats-server
accepts with TLS on clients (client certificates verified) and on routes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY, REPO, pod_spec, tierflow_command_problems

from tierflow.runtime.nats_server import find_nats_server_binary

TLS_ENV = ("TIERFLOW_TLS_CERT", "TIERFLOW_TLS_KEY", "TIERFLOW_TLS_CA")
OVERLAY = REPO / "deploy-tls"


def _without_tls(conf: str) -> list[str]:
    """A NATS config's lines, comments and `tls { ... }` blocks left out."""
    conf = re.sub(r"\n\s*tls \{[^}]*\}", "", conf)
    return [line.strip() for line in conf.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize(("plain", "tls"), [(DEPLOY / "nats" / "nats.conf", DEPLOY / "nats" / "nats-tls.conf"),
                                            (DEPLOY / "k8s" / "nats.conf", OVERLAY / "nats.conf")], ids=["compose", "k8s"])  # fmt: skip
def test_the_tls_nats_configs_are_the_plain_ones_with_tls(plain: Path, tls: Path, init_secrets_tls: Path, tmp_path: Path) -> None:
    text = tls.read_text()
    assert _without_tls(text) == _without_tls(plain.read_text()), f"{tls.name} and {plain.name} differ beyond TLS"
    blocks = re.findall(r"tls \{[^}]*\}", text)
    assert len(blocks) == 2 and "verify: true" in blocks[0], "clients (with certificates verified) and routes"
    # As the server sees it: the generated auth beside it, the certificates where it reads them.
    text = text.replace("/etc/nats/tls/", f"{init_secrets_tls / 'tls'}/").replace("store_dir: /data", f"store_dir: {tmp_path / 'js'}")
    (tmp_path / "nats.conf").write_text(text)
    shutil.copy(init_secrets_tls / "nats" / "nats-auth.conf", tmp_path)
    out = subprocess.run([str(find_nats_server_binary()), "-c", str(tmp_path / "nats.conf"), "-t"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SERVER_NAME": "nats-0", "ROUTE_HOST": "127.0.0.1"})  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def _compose_config(tmp_path: Path) -> dict[str, Any]:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed")
    out = subprocess.run([compose, "-f", "docker-compose.yml", "-f", "docker-compose.tls.yml", "config"], capture_output=True, text=True,
                         timeout=60, cwd=DEPLOY)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_with_tls_gives_every_container_the_certificates(tmp_path: Path, init_secrets_tls: Path) -> None:
    config = _compose_config(tmp_path)
    secrets = (DEPLOY / "secrets").resolve()
    assert config["services"]["secrets-init"]["environment"]["TIERFLOW_TLS"] == "1", "secrets-init makes the TLS files"
    ours = {n: s for n, s in config["services"].items() if str(s.get("image", "")).startswith("tierflow") and n != "secrets-init"}
    assert {"router", "model-registry", "autoscaler", "prefill-0", "decode-0", "decode-1", "cli"} <= set(ours)
    for name, svc in ours.items():
        env = svc.get("environment") or {}
        mounts = {m.split(":")[1]: Path(m.split(":")[0]) for m in svc.get("volumes", []) if isinstance(m, str)}
        for var in TLS_ENV:
            assert env.get(var) in mounts, f"{name}: {var} names no mounted file"
            source = mounts[env[var]]
            assert source.is_relative_to(secrets / "tls") and (init_secrets_tls / "tls" / source.name).is_file(), f"{name}: {var} from {source}"
        assert "ca-key.pem" not in {p.name for p in mounts.values()}, f"{name} holds the CA's key"
        if name != "cli":
            argv = svc["command"] if isinstance(svc["command"], list) else svc["command"].split()
            assert not tierflow_command_problems(argv, {k: str(v) for k, v in env.items()}), name
    healthcheck = " ".join(ours["router"]["healthcheck"]["test"])
    assert "https://127.0.0.1:8000/health" in healthcheck and env_ca(ours["router"]) in healthcheck
    for n in (1, 2, 3):
        mounts = {m.split(":")[1]: m.split(":")[0] for m in config["services"][f"nats-{n}"]["volumes"] if isinstance(m, str)}
        assert mounts["/etc/nats/nats.conf"].endswith("/nats/nats-tls.conf")
        assert {p for p in mounts if p.startswith("/etc/nats/tls/")} == {"/etc/nats/tls/server.pem", "/etc/nats/tls/server-key.pem", "/etc/nats/tls/ca.pem"}


def env_ca(svc: dict[str, Any]) -> str:
    return str(svc["environment"]["TIERFLOW_TLS_CA"])


def test_the_kubernetes_overlay_gives_every_pod_the_certificates(tmp_path: Path, init_secrets_tls: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("secrets"))
    shutil.copytree(init_secrets_tls, tmp_path / "deploy" / "secrets")
    shutil.copytree(OVERLAY, tmp_path / "deploy-tls")
    out = subprocess.run([kubectl, "kustomize", str(tmp_path / "deploy-tls")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    secret = next(d for d in rendered if d["kind"] == "Secret" and d["metadata"]["name"].startswith("tierflow-tls-"))
    assert set(secret["data"]) == {"ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"}, "never the CA's key"
    assert secret["metadata"]["namespace"] == "tierflow"
    workloads = {d["metadata"]["name"]: d for d in rendered if pod_spec(d) is not None}
    tierflow = {n: d for n, d in workloads.items() if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "tierflow"}
    assert {"router", "model-registry", "autoscaler", "tierflow-default-decode", "tierflow-default-prefill"} == set(tierflow)
    for name, doc in tierflow.items():
        spec = pod_spec(doc)
        assert spec is not None
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        volume = next(v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == secret["metadata"]["name"])
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        files = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
        assert {env[var] for var in TLS_ENV} == files and mount["readOnly"], name
        assert not tierflow_command_problems([str(a) for a in container["args"]], {k: v or "x" for k, v in env.items()}), name
    assert workloads["router"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert "grpc" not in workloads["model-registry"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"], "the kubelet's gRPC probe has no TLS"
    nats_config = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("nats-config-"))
    assert nats_config["data"]["nats.conf"] == (OVERLAY / "nats.conf").read_text()
    sources = next(v for v in pod_spec(workloads["nats"])["volumes"] if v["name"] == "config")["projected"]["sources"]  # type: ignore[index]
    tls_items = next(s["secret"]["items"] for s in sources if s.get("secret", {}).get("name") == secret["metadata"]["name"])
    assert {i["path"] for i in tls_items} == {"tls/server.pem", "tls/server-key.pem", "tls/ca.pem"}
    try:
        import kubernetes_validate
    except ImportError:
        return
    for doc in rendered:
        kubernetes_validate.validate(doc, "1.30", strict=True)
