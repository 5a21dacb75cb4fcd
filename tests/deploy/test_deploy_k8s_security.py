"""The manifests' least privilege: security contexts, service-account tokens, and RBAC.

Every container (ours and the third-party ones, NATS included) runs as a non-root uid
with no capabilities, no privilege escalation, the runtime's default seccomp profile and
a read-only root filesystem, its writable paths being volumes. Only pods that call the
Kubernetes API get a token. No Role grants a wildcard; the autoscaler's grants exactly
what services/autoscaler/kubernetes.py calls (a fake API server that enforces the Role
checks it against the real actuator).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from deploy_checks import DEPLOY, k8s_documents, pod_spec

DOCS = k8s_documents()
WORKLOADS = {doc["metadata"]["name"]: doc for _, doc in DOCS if pod_spec(doc) is not None}
# Pods that call the Kubernetes API (and so get their service account's token).
API_CLIENTS = {"autoscaler", "prometheus"}


def _containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) for every container, init containers included."""
    out = []
    for name, doc in WORKLOADS.items():
        spec = pod_spec(doc)
        assert spec is not None
        for container in spec.get("initContainers", []) + spec["containers"]:
            out.append((name, spec, container))
    return out


def _effective(spec: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field as Kubernetes applies it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else spec.get("securityContext", {}).get(key)


@pytest.mark.parametrize(("workload", "spec", "container"), _containers(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_container_runs_unprivileged(workload: str, spec: dict[str, Any], container: dict[str, Any]) -> None:
    where = f"{workload}/{container['name']}"
    assert _effective(spec, container, "runAsNonRoot") is True, f"{where}: runAsNonRoot"
    uid = _effective(spec, container, "runAsUser")
    assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser must be a non-zero uid (images without USER run as root)"
    assert (_effective(spec, container, "seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile"
    own = container.get("securityContext", {})
    assert own.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
    assert own.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
    assert own.get("capabilities", {}).get("drop") == ["ALL"] and not own.get("capabilities", {}).get("add"), f"{where}: capabilities"
    assert not own.get("privileged"), where
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), f"{workload}: {key}"


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_writable_paths_are_volumes(workload: str) -> None:
    """Read-only root: whatever a container writes must be a mounted volume, not the image."""
    spec = pod_spec(WORKLOADS[workload])
    assert spec is not None
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in WORKLOADS[workload]["spec"].get("volumeClaimTemplates", [])}
    for container in spec["containers"]:
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for mount in mounts.values():
            assert mount["name"] in volumes or mount["name"] in claims, f"{workload}: volume {mount['name']} not defined"
            source = volumes.get(mount["name"], {})
            if "configMap" in source or "secret" in source:
                assert mount.get("readOnly") is True, f"{workload}: {mount['mountPath']} (configuration) should be mounted read-only"
        if container["image"].startswith("tierflow"):
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{workload}: Python needs a writable /tmp"


def test_nats_writes_only_its_volume_and_can() -> None:
    """The nats image (FROM scratch, no USER) would run as root: here it runs as a uid that
    owns nothing in the image, so JetStream's store must be the volume, group-writable (fsGroup)."""
    nats = WORKLOADS["nats"]
    spec = pod_spec(nats)
    assert spec is not None
    store = re.search(r"store_dir:\s*(\S+)", (DEPLOY / "k8s" / "nats.conf").read_text())
    assert store is not None
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts[store.group(1)] in {c["metadata"]["name"] for c in nats["spec"]["volumeClaimTemplates"]}
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


def test_tierflow_pods_run_as_the_images_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+):(\d+)", dockerfile, re.M)[-1]
    for name, spec, container in _containers():
        if container["image"].startswith("tierflow"):
            assert (str(_effective(spec, container, "runAsUser")), str(_effective(spec, container, "runAsGroup"))) == user, name


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_only_api_clients_get_a_service_account_token(workload: str) -> None:
    spec = pod_spec(WORKLOADS[workload])
    assert spec is not None
    if workload in API_CLIENTS:
        assert spec.get("serviceAccountName") == workload and spec.get("automountServiceAccountToken", True)
    else:
        assert "serviceAccountName" not in spec and spec.get("automountServiceAccountToken") is False, \
            f"{workload} calls no Kubernetes API: automountServiceAccountToken: false"  # fmt: skip


# --------------------------------------------------------------------------- RBAC


def _objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def test_no_cluster_wide_rights_and_no_wildcards() -> None:
    assert not _objects("ClusterRole") and not _objects("ClusterRoleBinding"), "every grant stays in the namespace"
    for name, role in _objects("Role").items():
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"Role {name}: wildcard in {key}"
            assert not any(r.endswith("/*") for r in rule["resources"]), f"Role {name}: subresource wildcard"
            assert "nonResourceURLs" not in rule


def _autoscaler_rules() -> list[dict[str, Any]]:
    binding = next(b for b in _objects("RoleBinding").values() if any(s["name"] == "autoscaler" for s in b["subjects"]))
    return _objects("Role")[binding["roleRef"]["name"]]["rules"]


def test_the_autoscaler_role_is_limited_to_scaling_its_node_pools() -> None:
    """Verbs per resource within what the actuator needs: the node pools' StatefulSets' scale
    subresource, by name; no pods (a StatefulSet removes its highest ordinal: nothing to mark)."""
    ceiling = {("apps", "statefulsets/scale"): {"get", "patch"}}
    pools = {name for name, doc in WORKLOADS.items() if "tierflow.io/pool" in doc["metadata"]["labels"]}
    assert pools == {"tierflow-default-decode", "tierflow-default-prefill"}
    for rule in _autoscaler_rules():
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) in ceiling, f"the autoscaler may not touch {group or 'core'}/{resource}"
                assert set(rule["verbs"]) <= ceiling[(group, resource)], f"{group}/{resource}: {rule['verbs']}"
                if group == "apps":
                    assert set(rule.get("resourceNames", [])) == pools, "statefulsets only by name: the node pools, all of them"


def test_no_admission_policy_is_left_behind() -> None:
    """The deletion-cost policy guarded pod patches the autoscaler no longer makes."""
    assert not _objects("ValidatingAdmissionPolicy") and not _objects("ValidatingAdmissionPolicyBinding")
