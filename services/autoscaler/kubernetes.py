"""The Kubernetes actuator: each pool of a tierflow deployment is one apps/v1 StatefulSet.

Convention (the manifests in deploy/ follow it):

- StatefulSet name: `kube_name_template` with `{deployment}` = the tierflow deployment
  name lower-cased, every run of characters outside [a-z0-9-] replaced by one "-",
  leading/trailing "-" dropped; `{pool}` = "decode" or "prefill". Default template
  `tierflow-{deployment}-{pool}`: deployment "default" -> `tierflow-default-decode`.
  A name over 52 characters (a StatefulSet's limit: its pods carry the label
  controller-revision-hash = name + "-" + 10 characters, at most 63) is cut to 43 and
  suffixed "-" + the first 8 hex digits of sha1(tierflow deployment name).
- Each node's id is its pod name, `<statefulset>-<ordinal>` (TIERFLOW_NODE_ID from the
  downward API `metadata.name`). Why a StatefulSet: a node's NATS identity must exist
  before its pod does (deploy/init-secrets.sh makes one per ordinal up to the pool's max
  replicas), so pod names must be known in advance.
- Scale-up: PATCH the StatefulSet's `scale` subresource to replicas + n.
- Scale-down: a StatefulSet always removes its highest ordinal, so the autoscaler drains
  exactly that pod (`choose_victims`: the highest ordinals among the live nodes; the
  shell asks this actuator instead of its cheapest-node rule), then `stop_node` PATCHes
  `scale` to that ordinal. A node that is not the highest ordinal left is refused
  (ActuatorError: the shell puts it back in rotation and decides again next tick),
  since scaling down would remove another pod, possibly one still serving streams. The
  pod still gets SIGTERM and drains itself; terminationGracePeriodSeconds must exceed
  the node's drain grace.
- Stopping is idempotent, since a restarted autoscaler repeats a stop it may have
  begun: a node whose ordinal is at or above the replicas already has had its replica
  given back, so nothing more is done.
- Neither the pod template nor any pod is touched: region (node selectors, topology)
  and residency stay what the manifest says.
- RBAC for the autoscaler's service account, in the namespace: `statefulsets/scale`
  get + patch, for the pools' names only.

The API is reached with the in-cluster service-account token (re-read per call: it is
rotated) over HTTPS with the cluster CA, through urllib in a worker thread. No client
library: two calls do not justify one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tierflow.contracts import registry
from tierflow.scaling.victims import NodeLoad, highest_ordinals, ordinal
from tierflow.services.autoscaler.actuators import ActuatorError

__all__ = ["KubeApi", "KubeApiError", "KubernetesActuator", "kube_name", "MAX_NAME"]

MAX_NAME = 52  # a StatefulSet's name: its pods' controller-revision-hash label adds 11 characters, at most 63
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_MERGE_PATCH = "application/merge-patch+json"


def kube_name(template: str, deployment: str, pool: str) -> str:
    """The Kubernetes StatefulSet running `pool` of tierflow deployment `deployment`."""
    slug = re.sub(r"[^a-z0-9-]+", "-", deployment.lower()).strip("-") or "x"
    name = template.format(deployment=slug, pool=pool)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9].rstrip("-") + "-" + hashlib.sha1(deployment.encode()).hexdigest()[:8]
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
        return f"/apis/apps/v1/namespaces/{self.namespace}/statefulsets/{name}/scale"

    async def _replicas(self, name: str) -> int:
        try:
            scale = await self._api.request("GET", self._scale_path(name))
        except KubeApiError as exc:
            if exc.status == 404:
                raise ActuatorError(f"no StatefulSet {self.namespace}/{name} (tierflow expects one per deployment and pool)") from None
            raise
        return int(scale.get("spec", {}).get("replicas", 0))

    async def _set_replicas(self, name: str, replicas: int) -> None:
        await self._api.request("PATCH", self._scale_path(name), {"spec": {"replicas": replicas}})

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def choose_victims(self, deployment: registry.DeploymentRecord, pool: str, nodes: Sequence[NodeLoad], count: int) -> list[str]:
        """The pods the StatefulSet removes when scaled down by `count`: its highest
        ordinals among `nodes` (the pool's live nodes), never past a cordoned one."""
        return highest_ordinals(nodes, count, self.deployment_name(deployment.name, pool))

    async def start_nodes(self, deployment: registry.DeploymentRecord, pool: str, count: int) -> list[str]:
        name = self.deployment_name(deployment.name, pool)
        async with self._lock(name):
            await self._set_replicas(name, await self._replicas(name) + count)
        return []  # the new pods' names follow the ordinals, but they are not started yet

    async def stop_node(self, deployment: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        name = self.deployment_name(deployment.name, pool)
        index = ordinal(node_id, name)
        if index is None:
            raise ActuatorError(f"{node_id} is no pod of StatefulSet {self.namespace}/{name} (node ids are pod names, {name}-<ordinal>)")
        async with self._lock(name):
            replicas = await self._replicas(name)
            if index >= replicas:
                return  # its replica was given back already (a stop repeated after a restart)
            if index != replicas - 1:
                raise ActuatorError(f"{node_id} is not the highest ordinal of StatefulSet {self.namespace}/{name} ({replicas} replicas): "
                                    f"scaling down would remove {name}-{replicas - 1} instead")  # fmt: skip
            await self._set_replicas(name, index)

    async def provisioned(self, deployment: registry.DeploymentRecord, pool: str) -> int:
        return await self._replicas(self.deployment_name(deployment.name, pool))
