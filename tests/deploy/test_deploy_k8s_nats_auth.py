"""Kubernetes NATS identities (issue 15): the servers refuse anonymous clients, and every pod
that talks to NATS mounts exactly its own credentials, the routers' and nodes' chosen by pod
name, with an identity made in advance for every ordinal a StatefulSet may reach.

What the pods see is derived from the manifests as the kubelet builds it: the env var
TIERFLOW_NATS_CREDS names a file, one volumeMount puts a single key of one Secret there
(`subPath`, or `subPathExpr` expanded with the pod's own name), the Secret is what
kustomization.yaml generates from deploy/secrets, and deploy/init-secrets.sh made that
file holding the identity the process must speak as.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from deploy_checks import DEPLOY, k8s_documents, node_pools, pod_spec

from tierflow.runtime import nats_auth
from tierflow.runtime.nats_server import find_nats_server_binary, free_port

DOCS = k8s_documents()
WORKLOADS = {doc["metadata"]["name"]: doc for _, doc in DOCS if pod_spec(doc) is not None}
ROLES = {"router": nats_auth.ROUTER, "model-registry": nats_auth.REGISTRY, "autoscaler": nats_auth.AUTOSCALER,
         "decode-node": nats_auth.NODE, "prefill-node": nats_auth.NODE}  # fmt: skip


def _secret_files() -> dict[str, dict[str, str]]:
    """Secret name -> {key: file under deploy/}, as kustomization.yaml generates them."""
    kz = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out = {}
    for gen in kz.get("secretGenerator", []):
        files = {}
        for entry in gen["files"]:
            key, _, source = entry.rpartition("=")
            files[key or Path(source).name] = source
        out[gen["name"]] = files
    return out


def _pod_names(name: str, doc: dict[str, Any]) -> list[str]:
    """The pod names a workload may have: a StatefulSet's every ordinal up to the most
    replicas it may reach (a node pool: the fleet's max), one stand-in for a Deployment."""
    if doc["kind"] != "StatefulSet":
        return [f"{name}-7c9f8d6b5-x2k7q"]
    most = next((high for pool, _, high, _ in node_pools() if pool == name), doc["spec"]["replicas"])
    return [f"{name}-{i}" for i in range(most)]


def _expand(template: str, env: dict[str, str]) -> str:
    for key, value in env.items():
        template = template.replace(f"$({key})", value)
    assert "$(" not in template, f"unexpanded variable in {template!r}"
    return template


def _tierflow_pods() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(name, doc, c) for name, doc in WORKLOADS.items() for c in pod_spec(doc)["containers"] if c["image"].startswith("tierflow")]  # type: ignore[index]


def test_every_pod_that_talks_to_nats_mounts_exactly_its_own_identity(init_secrets: Path) -> None:
    secrets = _secret_files()
    seen: dict[str, str] = {}
    pods = _tierflow_pods()
    assert sorted(c["args"][0] for _, _, c in pods) == sorted(ROLES)
    for name, doc, container in pods:
        spec = pod_spec(doc)
        assert spec is not None
        env = {e["name"]: e for e in container.get("env", [])}
        path = env[nats_auth.CREDS_ENV]["value"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        creds_mounts = [m for m in container["volumeMounts"]
                        if "secret" in volumes[m["name"]] and any(k.endswith(".creds") for k in secrets[volumes[m["name"]]["secret"]["secretName"]])]  # fmt: skip
        assert [m["mountPath"] for m in creds_mounts] == [path], f"{name}: one credentials mount, at ${nats_auth.CREDS_ENV}"
        mount = creds_mounts[0]
        assert mount.get("readOnly") and ("subPath" in mount) != ("subPathExpr" in mount), f"{name}: a single file of the Secret, read-only"
        secret = volumes[mount["name"]]["secret"]
        assert secret.get("defaultMode") == 0o440 and spec["securityContext"].get("fsGroup") == spec["securityContext"]["runAsUser"], \
            f"{name}: only the pod's user may read it"  # fmt: skip
        role = ROLES[container["args"][0]]
        if "subPathExpr" in mount:
            assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", f"{name}: POD_NAME from the downward API"
            assert doc["kind"] == "StatefulSet", f"{name}: pod names are known in advance only for a StatefulSet"
        for pod in _pod_names(name, doc):
            key = _expand(mount.get("subPathExpr") or mount["subPath"], {"POD_NAME": pod})
            files = secrets[secret["secretName"]]
            assert key in files, f"pod {pod}: Secret {secret['secretName']} has no {key} (ordinals up to the pool's max replicas need one)"
            made = init_secrets / files[key].removeprefix("secrets/")
            identity = nats_auth.read_creds(made).identity
            expected = nats_auth.Identity(role, pod if role in (nats_auth.ROUTER, nats_auth.NODE) else "")
            assert identity == expected, f"pod {pod} would speak as {identity.name}, not {expected.name}"
            if role == nats_auth.NODE:
                assert env["TIERFLOW_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # the id its identity names
            assert seen.setdefault(identity.name, pod) == pod, f"{pod} and {seen[identity.name]} share {identity.name}"


def test_node_identities_exist_for_every_ordinal_up_to_max_replicas(init_secrets: Path) -> None:
    secrets = _secret_files()
    for name, sts, most, dep in node_pools():
        assert most >= dep.get("max_replicas", 1) or sts["metadata"]["labels"]["tierflow.io/pool"] == "prefill"
        volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "nats-creds")
        keys = set(secrets[volume["secret"]["secretName"]])
        assert keys == {f"node-{name}-{i}.creds" for i in range(most)}, f"{name}: one identity per ordinal 0..{most - 1}, no other"
        for i in range(most):
            assert (init_secrets / "nats" / f"node-{name}-{i}.creds").is_file()


def test_the_nats_servers_include_the_generated_authorization() -> None:
    conf = (DEPLOY / "k8s" / "nats.conf").read_text()
    assert "\ninclude nats-auth.conf" in conf and "no_auth_user" not in conf and "authorization" not in conf.replace("include nats-auth.conf", "")
    nats_sts = WORKLOADS["nats"]
    volumes = {v["name"]: v for v in pod_spec(nats_sts)["volumes"]}  # type: ignore[index]
    mount = next(m for m in nats_sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/nats")
    sources = volumes[mount["name"]]["projected"]["sources"]
    assert {"configMap": {"name": "nats-config"}} in sources and {"secret": {"name": "nats-auth"}} in sources, "nats-auth.conf beside nats.conf"
    assert _secret_files()["nats-auth"] == {"nats-auth.conf": "secrets/nats/nats-auth.conf"}


def _wait_port(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nats-server exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on {port}")


def test_the_kubernetes_nats_config_refuses_anonymous_clients(init_secrets: Path, tmp_path: Path) -> None:
    """The server as a pod runs it (deploy/k8s/nats.conf + the generated nats-auth.conf),
    ports and store moved for the test: no identity, no connection; a node's own, accepted."""
    conf = (DEPLOY / "k8s" / "nats.conf").read_text()
    assert "store_dir: /data" in conf
    (tmp_path / "nats.conf").write_text(conf.replace("store_dir: /data", f"store_dir: {json.dumps(str(tmp_path / 'js'))}"))
    shutil.copy(init_secrets / "nats" / "nats-auth.conf", tmp_path / "nats-auth.conf")
    port, monitor, cluster = free_port(), free_port(), free_port()
    proc = subprocess.Popen([str(find_nats_server_binary()), "-c", str(tmp_path / "nats.conf"), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor),
                             "--cluster", f"nats://127.0.0.1:{cluster}"],
                            env={"SERVER_NAME": "nats-0", "PATH": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_port(port, proc)
        node = nats_auth.read_creds(init_secrets / "nats" / "node-tierflow-default-decode-0.creds")

        async def scenario() -> None:
            with pytest.raises(Exception, match="(?i)authorization"):
                anonymous = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
                await anonymous.close()
            nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=5, **nats_auth.connect_options(node))
            await nc.flush()
            await nc.close()

        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(10)
