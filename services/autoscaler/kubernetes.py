"""The Kubernetes actuator: each pool of a tierflow deployment is one apps/v1 Deployment.

Convention (the manifests in deploy/ follow it):

- Deployment name: `kube_name_template` with `{deployment}` = the tierflow deployment
  name lower-cased, every run of characters outside [a-z0-9-] replaced by one "-",
  leading/trailing "-" dropped; `{pool}` = "decode" or "prefill". Default template
  `tierflow-{deployment}-{pool}`: deployment "default" -> `tierflow-default-decode`.
  A name over 63 characters is cut to 54 and suffixed "-" + the first 8 hex digits of
  sha1(tierflow deployment name).
- Each node's id is its pod name (TIERFLOW_NODE_ID from the downward API
  `metadata.name`), so the autoscaler can point at the pod it drained.
- Scale-up: PATCH the Deployment's `scale` subresource to replicas + n.
- Scale-down (after cordon and drain): annotate the drained pod with
  `controller.kubernetes.io/pod-deletion-cost: "-1000"` so the ReplicaSet removes that
  pod and no other, then PATCH `scale` to replicas - 1. The pod still gets SIGTERM and
  drains itself; terminationGracePeriodSeconds must exceed the node's drain grace.
  If anything after the annotation fails, the annotation is removed again (a merge
  patch with null) before the error is reported: a pod that stays must not remain the
  ReplicaSet's first choice for the next, unrelated scale-down.
- Stopping is idempotent, since a restarted autoscaler repeats a stop it may have
  begun: a pod already terminating (`deletionTimestamp` set) has had its replica given
  back, so nothing more is done. A pod already gone still gives its replica back.
- The pod template is never touched: region (node selectors, topology) and residency
  stay what the manifest says.
- RBAC for the autoscaler's service account, in the namespace: `deployments/scale`
  get + patch, `pods` get + patch.

The API is reached with the in-cluster service-account token (re-read per call: it is
rotated) over HTTPS with the cluster CA, through urllib in a worker thread. No client
library: three calls do not justify one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tierflow.contracts import registry
from tierflow.services.autoscaler.actuators import ActuatorError

__all__ = ["KubeApi", "KubeApiError", "KubernetesActuator", "kube_name", "DELETION_COST"]

log = logging.getLogger("tierflow.autoscaler")
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_MERGE_PATCH = "application/merge-patch+json"


def kube_name(template: str, deployment: str, pool: str) -> str:
    """The Kubernetes Deployment running `pool` of tierflow deployment `deployment`."""
    slug = re.sub(r"[^a-z0-9-]+", "-", deployment.lower()).strip("-") or "x"
    name = template.format(deployment=slug, pool=pool)
    if len(name) > 63:
        name = name[:54].rstrip("-") + "-" + hashlib.sha1(deployment.encode()).hexdigest()[:8]
    return name


class KubeApiError(ActuatorError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status or 'unreachable'}: {message}")
        self.status = status


class KubeApi:
    """Just enough of a Kubernetes API client: JSON requests with a bearer token."""

    def __init__(self, base_url: str, *, token_file: str = "", ca_file: str = "", timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token_file = Path(token_file) if token_file else None
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if self.base_url.startswith("https://"):
            cafile = ca_file if ca_file and Path(ca_file).is_file() else None
            self._ssl = ssl.create_default_context(cafile=cafile)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self._token_file is not None and self._token_file.is_file():
            headers["Authorization"] = f"Bearer {self._token_file.read_text().strip()}"
        return headers

    def _call(self, method: str, path: str, body: dict[str, Any] | None, content_type: str | None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=self._headers(content_type if data else None))
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._ssl) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise KubeApiError(exc.code, f"{method} {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise KubeApiError(0, f"{method} {self.base_url}{path}: {exc}") from None
        return json.loads(raw) if raw else {}

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None, *, content_type: str = _MERGE_PATCH) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, method, path, body, content_type)


class KubernetesActuator:
    name = "kubernetes"

    def __init__(self, api: KubeApi, namespace: str, *, name_template: str = "tierflow-{deployment}-{pool}") -> None:
        self._api = api
        self.namespace = namespace
        self._template = name_template
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> KubernetesActuator:
        """In-cluster defaults: API from KUBERNETES_SERVICE_HOST/PORT, namespace from the
        service account, unless the settings name them."""
        url = settings.kube_api_url
        if not url:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST): set --kube-api-url")
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        namespace = settings.kube_namespace
        if not namespace:
            ns_file = SA_DIR / "namespace"
            namespace = ns_file.read_text().strip() if ns_file.is_file() else "default"
        api = KubeApi(url, token_file=settings.kube_token_file, ca_file=settings.kube_ca_file, timeout=settings.actuation_timeout)
        return cls(api, namespace, name_template=settings.kube_name_template)

    def deployment_name(self, deployment: str, pool: str) -> str:
        return kube_name(self._template, deployment, pool)

    def _scale_path(self, name: str) -> str:
        return f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}/scale"

    async def _replicas(self, name: str) -> int:
        try:
            scale = await self._api.request("GET", self._scale_path(name))
        except KubeApiError as exc:
            if exc.status == 404:
                raise ActuatorError(f"no Deployment {self.namespace}/{name} (tierflow expects one per deployment and pool)") from None
            raise
        return int(scale.get("spec", {}).get("replicas", 0))

    async def _set_replicas(self, name: str, replicas: int) -> None:
        await self._api.request("PATCH", self._scale_path(name), {"spec": {"replicas": replicas}})

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def start_nodes(self, deployment: registry.DeploymentRecord, pool: str, count: int) -> list[str]:
        name = self.deployment_name(deployment.name, pool)
        async with self._lock(name):
            await self._set_replicas(name, await self._replicas(name) + count)
        return []  # Kubernetes names the pods

    def _pod_path(self, pod: str) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{pod}"

    async def _terminating(self, pod: str) -> bool:
        """The pod is on its way out already (deletionTimestamp set); False when it is gone."""
        try:
            found = await self._api.request("GET", self._pod_path(pod))
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        return bool(found.get("metadata", {}).get("deletionTimestamp"))

    async def stop_node(self, deployment: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        name = self.deployment_name(deployment.name, pool)
        async with self._lock(name):
            if await self._terminating(node_id):
                return  # its replica was given back already (a stop repeated after a restart)
            annotated = False
            try:
                await self._api.request("PATCH", self._pod_path(node_id), {"metadata": {"annotations": {DELETION_COST: "-1000"}}})
                annotated = True
            except KubeApiError as exc:
                if exc.status != 404:  # no such pod: it is gone already; still give the replica back
                    raise
            try:
                await self._set_replicas(name, max(0, await self._replicas(name) - 1))
            except Exception as exc:
                if annotated:
                    await self._unmark(node_id, exc)
                raise

    async def _unmark(self, pod: str, cause: BaseException) -> None:
        """Take the deletion cost off a pod that stays (the scale-down failed)."""
        try:
            await self._api.request("PATCH", self._pod_path(pod), {"metadata": {"annotations": {DELETION_COST: None}}})
        except KubeApiError as exc:
            if exc.status == 404:
                return
            log.error("pod %s keeps %s after a failed scale-down (%s): the next scale-down of its Deployment removes it first; "
                      "remove it by hand: kubectl -n %s annotate pod %s %s- (could not: %s)", pod, DELETION_COST, cause, self.namespace, pod, DELETION_COST, exc)  # fmt: skip

    async def provisioned(self, deployment: registry.DeploymentRecord, pool: str) -> int:
        return await self._replicas(self.deployment_name(deployment.name, pool))
