"""The Kubernetes manifests: schema-valid, consistent with each other, and runnable commands.

Schema: kubernetes-validate ships the Kubernetes OpenAPI schemas as JSON files inside
its wheel, so it validates offline; strict mode also refuses unknown fields (a
misspelt `readinessProbe` key would otherwise be dropped silently by the API server).
When `kubectl` is installed, the kustomize build is rendered and validated as well.
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
from deploy_checks import DEPLOY, container_env, k8s_documents, node_pools, option_value, pod_spec, tierflow_command_problems

from tierflow.runtime.nats_server import find_nats_server_binary

K8S_VERSION = "1.30"  # the oldest minor still in upstream support when these were written
DOCS = k8s_documents()


def _objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def _workloads() -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets by name."""
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] in ("Deployment", "StatefulSet")}


def _tierflow_containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for _, doc in DOCS:
        spec = pod_spec(doc)
        for container in spec["containers"] if spec else []:
            if container["image"].split(":")[0] == "tierflow":
                out.append((doc["metadata"]["name"], container))
    return out


def _validate(doc: dict[str, Any]) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']}/{doc['metadata']['name']}: at {'.'.join(map(str, exc.path))}: {exc.message}"
    return None


def test_every_manifest_matches_the_kubernetes_schema() -> None:
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (bundles the Kubernetes schemas)")
    assert len(DOCS) >= 20
    problems = [p for _, doc in DOCS if (p := _validate(doc))]
    assert not problems, "\n".join(problems)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    pytest.importorskip("kubernetes_validate")
    router = _workloads()["router"]
    broken = yaml.safe_load(yaml.safe_dump(router))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGets"] = {"path": "/health"}
    assert _validate(broken)


def test_every_object_is_named_and_labelled() -> None:
    for path, doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"].get("name"), path
        if doc["kind"] != "Namespace":
            assert "namespace" not in doc["metadata"], f"{path}: the namespace comes from kustomization.yaml"
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "tierflow", f"{path}: {doc['kind']}/{doc['metadata']['name']}"


def test_workload_selectors_match_their_pod_labels_and_services_find_pods() -> None:
    pods = {}
    for _, doc in DOCS:
        if pod_spec(doc) is not None:
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), doc["metadata"]["name"]
            pods[doc["metadata"]["name"]] = doc
    for name, svc in _objects("Service").items():
        matches = [p for p in pods.values() if svc["spec"]["selector"].items() <= p["spec"]["template"]["metadata"]["labels"].items()]
        assert matches, f"Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            named = {p["name"] for m in matches for c in pod_spec(m)["containers"] for p in c.get("ports", [])}  # type: ignore[index]
            assert port["targetPort"] in named, f"Service {name}: targetPort {port['targetPort']} is no container port"


def test_every_tierflow_container_runs_a_valid_command() -> None:
    containers = _tierflow_containers()
    assert sorted(c["args"][0] for _, c in containers) == ["autoscaler", "decode-node", "model-registry", "prefill-node", "router"]
    problems = []
    for name, container in containers:
        assert "command" not in container, f"{name}: keep the image's ENTRYPOINT (tierflow); pass `args`"
        problems += [f"{name}: {p}" for p in tierflow_command_problems([str(a) for a in container["args"]], container_env(container))]
    assert not problems, "\n".join(problems)


def test_probes_and_scrape_annotations_use_the_ports_the_commands_open() -> None:
    workloads = _workloads()
    for name, container in _tierflow_containers():
        args = [str(a) for a in container["args"]]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        annotations = workloads[name]["spec"]["template"]["metadata"]["annotations"]
        metrics = int(option_value(args, "--metrics-port") or 0) or int(option_value(args, "--http-port") or 0)
        assert option_value(args, "--metrics-host") == "0.0.0.0" or not option_value(args, "--metrics-port"), f"{name}: Prometheus scrapes from another pod"
        assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == metrics, name
        assert metrics in ports.values(), f"{name}: metrics port {metrics} is not a declared container port"
        for flag in ("--http-host", "--grpc-host"):
            if flag in args:
                assert option_value(args, flag) == "0.0.0.0", f"{name}: {flag} must accept traffic from outside the pod"
        assert container_env(container)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        if name == "router":
            probe = container["readinessProbe"]["httpGet"]
            assert probe["path"] == "/health" and ports[probe["port"]] == int(option_value(args, "--http-port") or 0)
        if name == "model-registry":
            assert container["readinessProbe"]["grpc"]["port"] == int(option_value(args, "--grpc-port") or 0)
            mount = next(m for m in container["volumeMounts"] if m["name"] == "fleet")
            assert option_value(args, "--fleet") == f"{mount['mountPath']}/fleet.yaml"


def test_node_ids_come_from_the_pod_name() -> None:
    for name, container in _tierflow_containers():
        if container["args"][0].endswith("-node"):
            env = {e["name"]: e for e in container["env"]}
            assert env["TIERFLOW_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
            assert "--node-id" not in container["args"], f"{name}: replicas would share one node id"


def test_node_pools_are_statefulsets_the_kubernetes_actuator_finds() -> None:
    """Names, replicas and grace periods as services/autoscaler/kubernetes.py expects them:
    StatefulSets, so pod names (node ids) are known before the pods exist."""
    pools = {"decode": "decode-node", "prefill": "prefill-node"}
    assert not {n for n, d in _objects("Deployment").items() if "tierflow.io/pool" in d["metadata"]["labels"]}, "node pools are StatefulSets"
    for name, sts, _, dep in node_pools():
        pool = sts["metadata"]["labels"]["tierflow.io/pool"]
        spec = sts["spec"]
        container = spec["template"]["spec"]["containers"][0]
        args = [str(a) for a in container["args"]]
        assert args[0] == pools[pool] and option_value(args, "--deployment") == dep["name"]
        assert spec.get("podManagementPolicy") == "Parallel", f"{name}: a scale-up of several starts them together"
        drain = float(option_value(args, "--drain-grace") or 10)
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > drain, f"{name}: a removed node must finish its streams"
        if pool == "decode":
            assert dep["min_replicas"] <= spec["replicas"] <= dep["max_replicas"]
            assert spec["replicas"] == dep["replicas"]


def test_the_autoscaler_may_scale_the_pools_and_nothing_else() -> None:
    autoscaler = _objects("Deployment")["autoscaler"]
    container = autoscaler["spec"]["template"]["spec"]["containers"][0]
    assert container_env(container).get("TIERFLOW_ACTUATOR") == "kubernetes" or option_value(container["args"], "--actuator") == "kubernetes"
    account = autoscaler["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in _objects("ServiceAccount")
    binding = next(b for b in _objects("RoleBinding").values() if any(s["name"] == account for s in b["subjects"]))
    rules = _objects("Role")[binding["roleRef"]["name"]]["rules"]

    def allowed(group: str, resource: str, verb: str, name: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] and name in r.get("resourceNames", [name])
            for r in rules
        )

    for name, *_ in node_pools():
        assert allowed("apps", "statefulsets/scale", "get", name) and allowed("apps", "statefulsets/scale", "patch", name), name
    assert not allowed("", "pods", "patch", "tierflow-default-decode-0"), "a StatefulSet removes its highest ordinal: no pod is marked"


def test_nats_is_a_three_server_jetstream_cluster(init_secrets: Path, tmp_path: Path) -> None:
    nats = _objects("StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    headless = _objects("Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    conf = DEPLOY / "k8s" / "nats.conf"
    routes = set(re.findall(r"nats-route://([\w.-]+):6222", conf.read_text()))
    assert routes == {f"nats-{i}.{nats['spec']['serviceName']}" for i in range(3)}
    # As the pod sees /etc/nats: the ConfigMap's nats.conf and the Secret's nats-auth.conf.
    shutil.copy(conf, tmp_path / "nats.conf")
    shutil.copy(init_secrets / "nats" / "nats-auth.conf", tmp_path / "nats-auth.conf")
    out = subprocess.run([str(find_nats_server_binary()), "-c", str(tmp_path / "nats.conf"), "-t"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SERVER_NAME": "nats-0"})  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "jetstream" in conf.read_text()


# --------------------------------------------------------------------------- kustomize


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def test_kustomization_lists_every_manifest_and_generates_every_configmap_used() -> None:
    kz = _kustomization()
    listed = {DEPLOY / r for r in kz["resources"]}
    assert listed == set((DEPLOY / "k8s").glob("*.yaml")), "every manifest in deploy/k8s is applied, and nothing else"
    generated = set()
    for gen in kz["configMapGenerator"]:
        generated.add(gen["name"])
        for entry in gen["files"]:
            source = entry.split("=", 1)[-1]
            assert (DEPLOY / source).is_file(), f"{gen['name']}: {source} not found"
            assert (DEPLOY / source).resolve().is_relative_to(DEPLOY.resolve()), "kustomize only reads below its root"
    used = set()
    for _, doc in DOCS:
        spec = pod_spec(doc)
        for volume in spec.get("volumes", []) if spec else []:
            if "configMap" in volume:
                used.add(volume["configMap"]["name"])
                for item in volume["configMap"].get("items", []):
                    gen = next(g for g in kz["configMapGenerator"] if g["name"] == volume["configMap"]["name"])
                    assert any(f.startswith(item["key"] + "=") for f in gen["files"])
    assert used <= generated, f"ConfigMaps used but not generated: {sorted(used - generated)}"
    assert kz["namespace"] == next(iter(_objects("Namespace")))


def test_secrets_used_are_generated_from_the_secrets_directory(init_secrets: Path) -> None:
    """Secrets come from deploy/secrets/ (never committed), every file of which
    deploy/init-secrets.sh makes (the NATS ones through `tierflow nats-auth generate`)."""
    kz = _kustomization()
    generated = {gen["name"]: gen for gen in kz.get("secretGenerator", [])}
    used = {v["secret"]["secretName"] for _, doc in DOCS for v in (pod_spec(doc) or {}).get("volumes", []) if "secret" in v}
    used |= {s["secret"]["name"] for _, doc in DOCS for v in (pod_spec(doc) or {}).get("volumes", []) for s in v.get("projected", {}).get("sources", [])
             if "secret" in s}  # fmt: skip
    used |= {e["valueFrom"]["secretKeyRef"]["name"] for _, doc in DOCS for c in (pod_spec(doc) or {}).get("containers", [])
             for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
    assert used == set(generated), f"used {sorted(used)}, generated {sorted(generated)}"
    for gen in generated.values():
        for entry in gen["files"]:
            source = entry.split("=", 1)[-1]
            assert source.startswith("secrets/"), f"{gen['name']}: {source} must live in deploy/secrets (gitignored)"
            assert (init_secrets / source.removeprefix("secrets/")).is_file(), f"deploy/init-secrets.sh does not make {source}"
    ignored = (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignored, "deploy/secrets/ must never be committed"


def kustomize_root(tmp_path: Path, secrets: Path) -> Path:
    """A copy of deploy/ with `secrets` as its secrets (the real ones are made per
    installation and never committed)."""
    root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, root, ignore=shutil.ignore_patterns("secrets"))
    shutil.copytree(secrets, root / "secrets")
    return root


def kustomize(root: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the kustomization was checked structurally")
    out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomize_build_renders_and_validates(tmp_path: Path, init_secrets: Path) -> None:
    rendered = kustomize(kustomize_root(tmp_path, init_secrets))
    kz = _kustomization()
    assert len(rendered) == len(DOCS) + len(kz["configMapGenerator"]) + len(kz.get("secretGenerator", []))
    assert all(d["metadata"].get("namespace") == "tierflow" for d in rendered if d["kind"] != "Namespace")
    fleet = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tierflow-fleet"))
    assert fleet["data"]["fleet.yaml"] == (DEPLOY / "examples" / "fleet.yaml").read_text()
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        return  # the schema test above reports the missing package
    problems = [p for d in rendered if (p := _validate(d))]
    assert not problems, "\n".join(problems)


def test_prometheus_k8s_config_passes_promtool(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery; then the discovery block is
    swapped for a static one so the relabelling (the part that can be wrong) is still checked."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    path = DEPLOY / "prometheus" / "prometheus-k8s.yml"
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and "kubernetes_sd_configs not found" in out.stdout + out.stderr:
        config = yaml.safe_load(path.read_text())
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["10.0.0.7:9100"]}]
        path = tmp_path / "prometheus-k8s.yml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
