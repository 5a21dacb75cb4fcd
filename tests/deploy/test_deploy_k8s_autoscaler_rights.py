"""The autoscaler's rights, proven against the actuator that uses them.

A fake Kubernetes API server (real HTTP on 127.0.0.1) authorizes every request the way
the API server would with deploy/k8s: the bearer token names a service account, the
RoleBindings give it Roles, a request is allowed only if a rule matches its API group,
resource, subresource, name and verb. The real KubernetesActuator then scales each node
pool (a StatefulSet) up and back down, which must all be allowed, and a list of things
the autoscaler must not do (pods included: it no longer touches any) must all be refused.
The fake is the API server (not ours); the Role and the actuator are what we ship.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from deploy_checks import k8s_documents

from tierflow.contracts import registry
from tierflow.services.autoscaler.kubernetes import KubeApi, KubeApiError, KubernetesActuator

NS = "tierflow"
DOCS = k8s_documents()
TOKENS = {"autoscaler-token": f"system:serviceaccount:{NS}:autoscaler", "router-token": f"system:serviceaccount:{NS}:default"}
VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete", "POST": "create"}


def _objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


@dataclass
class FakeApiServer:
    """StatefulSets' scale and their pods, behind RBAC from the manifests."""

    replicas: dict[str, int] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: list[tuple[int, str, str]] = field(default_factory=list)  # status, method, path
    fail_scale_patch: bool = False

    def __post_init__(self) -> None:
        self.roles = {r["metadata"]["name"]: r["rules"] for r in _objects("Role")}
        self.bindings = [(f"system:serviceaccount:{NS}:{s['name']}", b["roleRef"]["name"]) for b in _objects("RoleBinding") for s in b["subjects"]]
        self.reset()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        """Every StatefulSet at its manifest's replicas, its pods as the template makes them."""
        self.replicas, self.pods, self.refused, self.fail_scale_patch = {}, {}, [], False
        for doc in _objects("StatefulSet"):
            self.replicas[doc["metadata"]["name"]] = doc["spec"]["replicas"]
            for i in range(doc["spec"]["replicas"]):
                name = f"{doc['metadata']['name']}-{i}"
                template = doc["spec"]["template"]
                self.pods[name] = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": NS, "labels": dict(template["metadata"]["labels"]),
                                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": doc["metadata"]["name"], "uid": "u1"}]},
                    "spec": copy.deepcopy(template["spec"]),
                }  # fmt: skip

    def authorized(self, user: str, group: str, resource: str, name: str, verb: str) -> bool:
        for subject, role in self.bindings:
            if subject != user:
                continue
            for rule in self.roles[role]:
                if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] \
                        and (not rule.get("resourceNames") or name in rule["resourceNames"]):  # fmt: skip
                    return True
        return False

    def pods_of(self, deployment: str) -> list[str]:
        return sorted(p for p in self.pods if p.startswith(deployment + "-"))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                if code >= 400:
                    api.refused.append((code, self.command, self.path))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, message: str) -> None:
                self._reply(code, {"kind": "Status", "code": code, "message": message})

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                user = TOKENS.get(self.headers.get("Authorization", "").removeprefix("Bearer "))
                if user is None:
                    return self._status(401, "Unauthorized")
                # /api/v1/namespaces/<ns>/<resource>[/<name>[/<sub>]] or /apis/<group>/<version>/namespaces/...
                parts = self.path.strip("/").split("/")
                group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
                if len(rest) < 2 or rest[0] != "namespaces":
                    return self._status(403, f"{user} cannot {self.command} {self.path} (cluster scope)")
                namespace, resource, name = rest[1], rest[2], rest[3] if len(rest) > 3 else ""
                sub = rest[4] if len(rest) > 4 else ""
                verb = VERBS[self.command] if name or self.command != "GET" else "list"
                full = f"{resource}/{sub}" if sub else resource
                if namespace != NS or not api.authorized(user, group, full, name, verb):
                    return self._status(403, f'{full} "{name}" is forbidden: User "{user}" cannot {verb} {full} in the namespace "{namespace}"')
                if (group, full) == ("apps", "statefulsets/scale"):
                    if name not in api.replicas:
                        return self._status(404, f'statefulsets.apps "{name}" not found')
                    if verb == "patch":
                        if api.fail_scale_patch:
                            return self._status(500, "Internal error occurred: admission webhook timed out")
                        api.replicas[name] = body["spec"]["replicas"]
                    return self._reply(200, {"kind": "Scale", "spec": {"replicas": api.replicas[name]}})
                if (group, full) == ("", "pods") and name:
                    if name not in api.pods:
                        return self._status(404, f'pods "{name}" not found')
                    if verb == "delete":
                        del api.pods[name]
                    return self._reply(200, api.pods.get(name, {}))
                return self._status(404, "the fake API server serves only what the actuator uses")

            do_GET = do_PATCH = do_PUT = do_DELETE = do_POST = _handle

        return Handler


@pytest.fixture(scope="module")
def api_server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def kube(api_server: FakeApiServer) -> FakeApiServer:
    api_server.reset()
    return api_server


def _api(kube: FakeApiServer, tmp_path: Path, token: str = "autoscaler-token") -> KubeApi:
    path = tmp_path / token
    path.write_text(token)
    return KubeApi(kube.url, token_file=str(path), timeout=5)


def _record() -> registry.DeploymentRecord:
    return registry.DeploymentRecord(name="default", bundle="b", models=[], replicas=2, min_replicas=1, max_replicas=4, mode="disaggregated", prefill_replicas=1)


@pytest.mark.parametrize("pool", ["decode", "prefill"])
def test_the_actuator_scales_a_pool_up_and_gives_back_the_drained_pod_within_its_rights(kube: FakeApiServer, tmp_path: Path, pool: str) -> None:
    actuator = KubernetesActuator(_api(kube, tmp_path), NS)
    name = actuator.deployment_name("default", pool)
    assert name in kube.replicas, f"no StatefulSet {name} in deploy/k8s"
    before = kube.replicas[name]

    async def scenario() -> None:
        await actuator.start_nodes(_record(), pool, 1)
        assert kube.replicas[name] == before + 1
        assert await actuator.provisioned(_record(), pool) == before + 1
        await actuator.stop_node(_record(), pool, f"{name}-{before}")  # the highest ordinal: the pod the StatefulSet removes
        assert kube.replicas[name] == before

    asyncio.run(scenario())
    assert kube.refused == [], "the Role refused a call the actuator makes"


STATEFULSETS = f"/apis/apps/v1/namespaces/{NS}/statefulsets"
PODS = f"/api/v1/namespaces/{NS}/pods"
FORBIDDEN = [
    ("GET", f"{STATEFULSETS}/tierflow-default-decode", None),  # the StatefulSet itself: its template, image
    ("PATCH", f"{STATEFULSETS}/tierflow-default-decode", {"spec": {"template": {"spec": {"serviceAccountName": "autoscaler"}}}}),
    ("PATCH", f"{STATEFULSETS}/router/scale", {"spec": {"replicas": 0}}),  # not a node pool
    ("PATCH", f"{STATEFULSETS}/nats/scale", {"spec": {"replicas": 0}}),
    ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/model-registry/scale", {"spec": {"replicas": 0}}),
    ("PUT", f"{STATEFULSETS}/tierflow-default-decode/scale", {"spec": {"replicas": 9}}),  # update: not needed
    ("GET", STATEFULSETS, None),  # list
    ("GET", PODS, None),  # list pods
    ("GET", f"{PODS}/<pod>", None),  # pods: nothing at all any more
    ("PATCH", f"{PODS}/<pod>", {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-1000"}}}),
    ("DELETE", f"{PODS}/<pod>", None),
    ("POST", PODS, {"metadata": {"name": "x"}}),
    ("GET", "/api/v1/namespaces/kube-system/pods/<pod>", None),
    ("GET", f"/api/v1/namespaces/{NS}/secrets/nats-nodes-tierflow-default-decode", None),
]


@pytest.mark.parametrize(("method", "path", "body"), FORBIDDEN, ids=[f"{m} {p.rsplit('/', 2)[-2]}/{p.rsplit('/', 1)[-1]}" for m, p, _ in FORBIDDEN])
def test_the_role_refuses_what_the_autoscaler_does_not_need(kube: FakeApiServer, tmp_path: Path, method: str, path: str, body: dict[str, Any] | None) -> None:
    path = path.replace("<pod>", kube.pods_of("tierflow-default-decode")[0])
    with pytest.raises(KubeApiError) as refused:
        asyncio.run(_api(kube, tmp_path).request(method, path, body))
    assert refused.value.status == 403, refused.value
