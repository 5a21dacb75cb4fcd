"""The Kubernetes actuator against a fake API server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages, registry
from tierflow.runtime.clock import VirtualClock
from tierflow.scaling import ScalingConfig
from tierflow.services.autoscaler.actuators import ActuatorError
from tierflow.scaling.fleet import FleetView
from tierflow.services.autoscaler.kubernetes import DELETION_COST, KubeApi, KubeApiError, KubernetesActuator, kube_name
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.scaler import Autoscaler
from tierflow.services.autoscaler.settings import Settings

NS = "tierflow"


class FakeKube:
    """Deployments' scale subresources and pod annotations, as the API server keeps them."""

    def __init__(self) -> None:
        self.replicas: dict[str, int] = {}
        self.annotations: dict[str, dict[str, str]] = {"pod-a": {}, "pod-b": {}}
        self.log: list[tuple[str, str, str, str, dict]] = []  # method, path, auth, content type, body
        self.forbidden = False
        self.terminating: set[str] = set()  # pods with a deletionTimestamp
        self.scale_patch_fails = False  # the scale subresource refuses a PATCH (e.g. an admission webhook)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        kube = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                kube.log.append((self.command, self.path, self.headers.get("Authorization", ""), self.headers.get("Content-Type", ""), body))
                if kube.forbidden:
                    return self._reply(403, {"kind": "Status", "message": 'deployments.apps "x" is forbidden: User "system:serviceaccount:tierflow:autoscaler" cannot patch'})
                parts = self.path.strip("/").split("/")
                if self.path.startswith(f"/apis/apps/v1/namespaces/{NS}/deployments/") and parts[-1] == "scale":
                    name = parts[-2]
                    if name not in kube.replicas:
                        return self._reply(404, {"kind": "Status", "message": f'deployments.apps "{name}" not found'})
                    if self.command == "PATCH":
                        if kube.scale_patch_fails:
                            return self._reply(500, {"kind": "Status", "message": "Internal error occurred: admission webhook timed out"})
                        kube.replicas[name] = body["spec"]["replicas"]
                    return self._reply(200, {"kind": "Scale", "spec": {"replicas": kube.replicas[name]}, "status": {"replicas": kube.replicas[name]}})
                if self.path.startswith(f"/api/v1/namespaces/{NS}/pods/"):
                    pod = parts[-1]
                    if pod not in kube.annotations:
                        return self._reply(404, {"kind": "Status", "message": f'pods "{pod}" not found'})
                    if self.command == "PATCH":  # a JSON merge patch: null removes the key
                        for key, value in body["metadata"]["annotations"].items():
                            if value is None:
                                kube.annotations[pod].pop(key, None)
                            else:
                                kube.annotations[pod][key] = value
                    metadata = {"name": pod, "annotations": kube.annotations[pod]}
                    if pod in kube.terminating:
                        metadata["deletionTimestamp"] = "2026-12-07T11:20:03Z"
                    return self._reply(200, {"kind": "Pod", "metadata": metadata})
                return self._reply(404, {"kind": "Status", "message": "no route"})

            do_GET = do_PATCH = _handle

        return Handler


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("token-1\n")
    return path


def actuator(kube: FakeKube, token: Path) -> KubernetesActuator:
    return KubernetesActuator(KubeApi(kube.url, token_file=str(token), timeout=5), NS)


def record(name: str = "default") -> registry.DeploymentRecord:
    return registry.DeploymentRecord(name=name, bundle="b", models=[], replicas=1, min_replicas=1, max_replicas=4, region="eu-west", residency="eu")


def test_deployment_names_follow_the_convention() -> None:
    template = "tierflow-{deployment}-{pool}"
    assert kube_name(template, "default", "decode") == "tierflow-default-decode"
    assert kube_name(template, "Llama_3.1/Chat", "prefill") == "tierflow-llama-3-1-chat-prefill"
    long = kube_name(template, "x" * 80, "decode")
    assert len(long) <= 63 and long.startswith("tierflow-xxx") and long != kube_name(template, "x" * 81, "decode")


async def test_scale_up_patches_the_scale_subresource(kube: FakeKube, token: Path) -> None:
    kube.replicas["tierflow-default-decode"] = 1
    act = actuator(kube, token)
    assert await act.provisioned(record(), "decode") == 1
    assert await act.start_nodes(record(), "decode", 2) == []
    assert kube.replicas["tierflow-default-decode"] == 3
    method, path, auth, content_type, body = kube.log[-1]
    assert (method, path) == ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/tierflow-default-decode/scale")
    assert auth == "Bearer token-1" and content_type == "application/merge-patch+json" and body == {"spec": {"replicas": 3}}
    token.write_text("token-2")  # the projected token is rotated: read per call
    assert await act.provisioned(record(), "decode") == 3
    assert kube.log[-1][2] == "Bearer token-2"


async def test_scale_down_marks_the_drained_pod_then_gives_one_replica_back(kube: FakeKube, token: Path) -> None:
    kube.replicas["tierflow-default-decode"] = 2
    await actuator(kube, token).stop_node(record(), "decode", "pod-b")
    assert kube.annotations == {"pod-a": {}, "pod-b": {DELETION_COST: "-1000"}}
    assert kube.replicas["tierflow-default-decode"] == 1
    pod, scale = f"/api/v1/namespaces/{NS}/pods/pod-b", f"/apis/apps/v1/namespaces/{NS}/deployments/tierflow-default-decode/scale"
    assert [entry[:2] for entry in kube.log] == [("GET", pod), ("PATCH", pod), ("GET", scale), ("PATCH", scale)]  # annotate first, then scale


async def test_a_failed_scale_down_leaves_no_deletion_cost_behind(kube: FakeKube, token: Path) -> None:
    """The pod stays (the scale patch failed), so it must not stay marked: the next,
    unrelated scale-down would remove it first, whatever the autoscaler chose then."""
    kube.replicas["tierflow-default-decode"] = 2
    kube.scale_patch_fails = True
    with pytest.raises(KubeApiError, match="500.*admission webhook"):
        await actuator(kube, token).stop_node(record(), "decode", "pod-b")
    assert kube.annotations == {"pod-a": {}, "pod-b": {}}
    assert kube.replicas["tierflow-default-decode"] == 2
    method, path, _, content_type, body = kube.log[-1]
    assert (method, path, content_type) == ("PATCH", f"/api/v1/namespaces/{NS}/pods/pod-b", "application/merge-patch+json")
    assert body == {"metadata": {"annotations": {DELETION_COST: None}}}


async def test_a_stop_repeated_after_a_restart_gives_no_second_replica_back(kube: FakeKube, token: Path) -> None:
    """A restarted autoscaler repeats a stop it may have begun: a pod already terminating
    had its replica given back, so the Deployment is not scaled down again."""
    kube.replicas["tierflow-default-decode"] = 1  # pod-b's replica is given back already
    kube.terminating.add("pod-b")
    await actuator(kube, token).stop_node(record(), "decode", "pod-b")
    assert kube.replicas["tierflow-default-decode"] == 1
    assert [entry[0] for entry in kube.log] == ["GET"] and kube.annotations["pod-b"] == {}


async def test_a_pod_already_gone_still_gives_its_replica_back(kube: FakeKube, token: Path) -> None:
    kube.replicas["tierflow-default-prefill"] = 3
    await actuator(kube, token).stop_node(record(), "prefill", "pod-gone")
    assert kube.replicas["tierflow-default-prefill"] == 2


async def test_errors_name_the_deployment_and_the_refusal(kube: FakeKube, token: Path) -> None:
    act = actuator(kube, token)
    with pytest.raises(ActuatorError, match=f"no Deployment {NS}/tierflow-default-decode"):
        await act.start_nodes(record(), "decode", 1)
    kube.forbidden = True
    with pytest.raises(KubeApiError, match="403.*forbidden") as err:
        await act.provisioned(record(), "decode")
    assert err.value.status == 403


async def test_unreachable_api_is_an_actuator_error(token: Path) -> None:
    from tierflow.runtime.nats_server import free_port

    act = KubernetesActuator(KubeApi(f"http://127.0.0.1:{free_port()}", token_file=str(token), timeout=2), NS)
    with pytest.raises(ActuatorError, match="unreachable"):
        await act.provisioned(record(), "decode")


def test_in_cluster_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    act = KubernetesActuator.from_settings(Settings(actuator="kubernetes", kube_namespace="prod"))
    assert act._api.base_url == "https://10.0.0.1:6443" and act.namespace == "prod"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ValueError, match="--kube-api-url"):
        KubernetesActuator.from_settings(Settings(actuator="kubernetes"))


async def test_the_autoscaler_scales_a_deployment_through_the_api(kube: FakeKube, token: Path) -> None:
    """The shell with this actuator: load on the one pod -> the Deployment is scaled, and the
    pods Kubernetes is starting count as starting (no second scale-up meanwhile)."""
    kube.replicas["tierflow-default-decode"] = 1
    clock = VirtualClock(100.0)
    fleet = FleetView()
    fleet.put_deployment(record())
    published: list[messages.AutoscalerDecision] = []

    async def publish(data: bytes) -> None:
        published.append(messages.decision_decoder.decode(data))

    class NoControl:
        async def command(self, node_id: str, action: str) -> messages.NodeCommandReply:
            raise AssertionError("no node is removed in this test")

    scaler = Autoscaler(fleet, actuator(kube, token), NoControl(), publish, clock, ScalingConfig(panic_window=0.0), AutoscalerMetrics(CollectorRegistry()))
    for _ in range(3):
        fleet.heard(messages.NodeHeartbeat(node_id="pod-a", deployment="default", running=8, queue_depth=12, max_batch=8), clock.monotonic())
        await scaler.tick()
        clock.advance(1.0)
    assert kube.replicas["tierflow-default-decode"] == 4  # ceil(20 requests / (8 slots * 0.7)), = max_replicas
    assert [d.action for d in published] == ["up", "hold", "hold"]
    assert published[1].inputs["starting"] == 3 and published[0].actuator == "kubernetes"
