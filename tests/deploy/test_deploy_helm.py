"""The Helm chart deploy/helm/tierflow renders the kustomize base's resources (issue 20).

The chart holds no manifests of its own: it reads deploy/kustomization.yaml and the files
it names through symlinks, and applies what kustomize's transformers would (namespace,
labels, image, generated names). Checked offline:

- structurally, always: Chart.yaml, every `.Values` path a template reads exists in
  values.yaml, and the symlinks reach every directory the kustomization reads;
- rendered by Helm's own engine (helm-python-sdk: the Helm Go SDK as a library, a dev
  dependency) and compared with `kubectl kustomize deploy/`: the same objects with the
  same content, up to the generated names' hash suffixes (each tool hashes its own way),
  the `managed-by` label's value, and the line wrapping of base64 data;
- the values do what they say: image, no Namespace, no Secrets.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY

CHART = DEPLOY / "helm" / "tierflow"
KUSTOMIZATION = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
GENERATED = [g["name"] for g in KUSTOMIZATION["configMapGenerator"] + KUSTOMIZATION.get("secretGenerator", [])]
_SUFFIXED = re.compile(rf"^({'|'.join(map(re.escape, GENERATED))})-[a-z0-9]{{10}}$")


def _values_paths(values: Any, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(values, dict):
        for key, value in values.items():
            path = f"{prefix}.{key}" if prefix else key
            out |= {path} | _values_paths(value, path)
    return out


def test_chart_is_well_formed_and_reads_only_values_it_declares() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "tierflow" and chart["version"]
    declared = _values_paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    templates = list((CHART / "templates").glob("*"))
    assert {t.name for t in templates} >= {"_helpers.tpl", "manifests.yaml", "generated.yaml"}
    used = {m for t in templates for m in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", t.read_text())}
    assert used, "the templates read no values"
    assert used <= declared, f"templates read values that values.yaml does not declare: {sorted(used - declared)}"


def test_chart_symlinks_reach_everything_the_kustomization_reads() -> None:
    reads = {"kustomization.yaml"} | {Path(r).parts[0] for r in KUSTOMIZATION["resources"]}
    for gen in KUSTOMIZATION["configMapGenerator"] + KUSTOMIZATION.get("secretGenerator", []):
        reads |= {Path(entry.split("=", 1)[-1]).parts[0] for entry in gen["files"]}
    for top in sorted(reads):
        link = CHART / top
        assert link.is_symlink(), f"{link} must be a symlink into deploy/ (one copy of each manifest)"
        assert link.resolve() == (DEPLOY / top).resolve(), f"{link} points at {link.resolve()}"


# --------------------------------------------------------------------------- rendering


def _deploy_copy(tmp_path: Path, secrets: Path) -> Path:
    """deploy/ with `secrets` as its secrets, the chart's symlinks kept (they reach them)."""
    root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, root, symlinks=True, ignore=lambda d, names: ["secrets"] if Path(d) == DEPLOY else [])
    shutil.copytree(secrets, root / "secrets")
    return root


def helm_render(chart: Path, values: dict[str, Any] | None = None, namespace: str = "tierflow") -> list[dict[str, Any]]:
    helm = pytest.importorskip("helm_python.chart", reason="helm-python-sdk (a dev dependency) not installed: the chart was checked structurally only")
    rendered = helm.Chart.load(str(chart)).render(values or {}, name="tierflow", namespace=namespace)
    return [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]


def kustomize(root: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: nothing to compare the chart's rendering with")
    out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _normal(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: "<manager>" if k == "app.kubernetes.io/managed-by" else _normal(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_normal(v) for v in x]
    return _SUFFIXED.sub(r"\1", x) if isinstance(x, str) else x


def by_object(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    out = {}
    for doc in docs:
        if doc["kind"] == "Secret":  # kustomize wraps long base64 lines, Helm does not
            doc = {**doc, "data": {k: base64.b64decode(v) for k, v in doc["data"].items()}}
        out[(doc["kind"], _SUFFIXED.sub(r"\1", doc["metadata"]["name"]))] = _normal(doc)
    return out


def test_helm_renders_the_same_resources_as_kustomize(tmp_path: Path, init_secrets: Path) -> None:
    root = _deploy_copy(tmp_path, init_secrets)
    helm = helm_render(root / "helm" / "tierflow")
    kust = kustomize(root)
    ours, theirs = by_object(helm), by_object(kust)
    assert len(helm) == len(ours) and len(kust) == len(theirs), "duplicate objects"
    assert ours.keys() == theirs.keys(), f"only Helm: {sorted(ours.keys() - theirs.keys())}; only kustomize: {sorted(theirs.keys() - ours.keys())}"
    differ = [key for key in theirs if ours[key] != theirs[key]]
    assert not differ, f"rendered differently: {differ}"
    # Generated names carry a content hash, and every reference uses the suffixed name.
    names = {d["metadata"]["name"] for d in helm if d["kind"] in ("ConfigMap", "Secret")}
    assert all(_SUFFIXED.match(n) for n in names), sorted(names)
    text = yaml.safe_dump_all(helm)
    for gen in GENERATED:
        assert not re.search(rf"name: {re.escape(gen)}\n", text), f"{gen} referenced without its suffix"


def test_values_change_image_namespace_and_secrets(tmp_path: Path) -> None:
    values = {"image": {"repository": "registry.example/tierflow", "tag": "1.2.3"}, "namespace": {"create": False}, "secrets": {"create": False}}
    docs = helm_render(CHART, values, namespace="inference")  # no secrets needed when not created
    kinds = {d["kind"] for d in docs}
    assert "Namespace" not in kinds and "Secret" not in kinds
    assert all(d["metadata"]["namespace"] == "inference" for d in docs)
    images = {c["image"] for d in docs for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])}
    assert "registry.example/tierflow:1.2.3" in images and not any(i.startswith("tierflow") for i in images)
    assert "nats:2.10" in images  # other images are left alone
    # The secrets' names are still referenced (suffixed), for Secrets made elsewhere.
    router = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "router")
    assert any(_SUFFIXED.match(v.get("secret", {}).get("secretName", "")) for v in router["spec"]["template"]["spec"]["volumes"])


def test_missing_secrets_fail_the_render_with_the_fix(tmp_path: Path) -> None:
    helm = pytest.importorskip("helm_python.chart", reason="helm-python-sdk (a dev dependency) not installed")
    root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, root, symlinks=True, ignore=lambda d, names: ["secrets"] if Path(d) == DEPLOY else [])
    (root / "secrets").mkdir()
    with pytest.raises(Exception, match="init-secrets.sh"):
        helm.Chart.load(str(root / "helm" / "tierflow")).render({}, name="tierflow", namespace="tierflow")
