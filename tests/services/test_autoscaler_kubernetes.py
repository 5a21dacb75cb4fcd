"""The Kubernetes actuator against a fake API server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import CollectorRegistry

from tierflow.contracts import messages, registry
from tierflow.runtime.clock import VirtualClock
from tierflow.scaling import ScalingConfig
from tierflow.services.autoscaler.actuators import ActuatorError
from tierflow.scaling.fleet import FleetView
from tierflow.scaling.victims import NodeLoad
from tierflow.services.autoscaler.kubernetes import MAX_NAME, KubeApi, KubeApiError, KubernetesActuator, kube_name
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.scaler import Autoscaler
from tierflow.services.autoscaler.settings import Settings

NS = "tierflow"


class FakeKube:
    """StatefulSets' scale subresources, as the API server keeps them."""

    def __init__(self) -> None:
        self.replicas: dict[str, int] = {}
        self.log: list[tuple[str, str, str, str, dict]] = []  # method, path, auth, content type, body
        self.forbidden = False
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
                    return self._reply(403, {"kind": "Status", "message": 'statefulsets.apps "x" is forbidden: User "system:serviceaccount:tierflow:autoscaler" cannot patch'})
                parts = self.path.strip("/").split("/")
                if self.path.startswith(f"/apis/apps/v1/namespaces/{NS}/statefulsets/") and parts[-1] == "scale":
                    name = parts[-2]
                    if name not in kube.replicas:
                        return self._reply(404, {"kind": "Status", "message": f'statefulsets.apps "{name}" not found'})
                    if self.command == "PATCH":
                        kube.replicas[name] = body["spec"]["replicas"]
                    return self._reply(200, {"kind": "Scale", "spec": {"replicas": kube.replicas[name]}, "status": {"replicas": kube.replicas[name]}})
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


def test_statefulset_names_follow_the_convention() -> None:
    template = "tierflow-{deployment}-{pool}"
    assert kube_name(template, "default", "decode") == "tierflow-default-decode"
    assert kube_name(template, "Llama_3.1/Chat", "prefill") == "tierflow-llama-3-1-chat-prefill"
    long = kube_name(template, "x" * 80, "decode")
    assert len(long) <= MAX_NAME == 52 and long.startswith("tierflow-xxx") and long != kube_name(template, "x" * 81, "decode")


SCALE = f"/apis/apps/v1/namespaces/{NS}/statefulsets/tierflow-default-decode/scale"


async def test_scale_up_patches_the_scale_subresource(kube: FakeKube, token: Path) -> None:
    kube.replicas["tierflow-default-decode"] = 1
    act = actuator(kube, token)
    assert await act.provisioned(record(), "decode") == 1
    assert await act.start_nodes(record(), "decode", 2) == []
    assert kube.replicas["tierflow-default-decode"] == 3
    method, path, auth, content_type, body = kube.log[-1]
    assert (method, path) == ("PATCH", SCALE)
    assert auth == "Bearer token-1" and content_type == "application/merge-patch+json" and body == {"spec": {"replicas": 3}}
    token.write_text("token-2")  # the projected token is rotated: read per call
    assert await act.provisioned(record(), "decode") == 3
    assert kube.log[-1][2] == "Bearer token-2"


async def test_scale_down_gives_back_the_drained_highest_ordinal(kube: FakeKube, token: Path) -> None:
    kube.replicas["tierflow-default-decode"] = 3
    await actuator(kube, token).stop_node(record(), "decode", "tierflow-default-decode-2")
    assert kube.replicas["tierflow-default-decode"] == 2
    assert [entry[:2] for entry in kube.log] == [("GET", SCALE), ("PATCH", SCALE)]  # no pod is touched


async def test_a_node_below_the_highest_ordinal_is_refused(kube: FakeKube, token: Path) -> None:
    """Scaling down would remove the highest ordinal, not the node drained: refused, and
    nothing changes (the shell puts the node back in rotation)."""
    kube.replicas["tierflow-default-decode"] = 3
    act = actuator(kube, token)
    with pytest.raises(ActuatorError, match="not the highest ordinal.*would remove tierflow-default-decode-2"):
        await act.stop_node(record(), "decode", "tierflow-default-decode-1")
    with pytest.raises(ActuatorError, match="no pod of StatefulSet"):
        await act.stop_node(record(), "decode", "tierflow-default-prefill-2")
    assert kube.replicas["tierflow-default-decode"] == 3 and [entry[0] for entry in kube.log] == ["GET"]


async def test_a_stop_repeated_after_a_restart_gives_no_second_replica_back(kube: FakeKube, token: Path) -> None:
    """A restarted autoscaler repeats a stop it may have begun: a node whose ordinal is at or
    above the replicas had its replica given back already, so nothing is scaled again."""
    kube.replicas["tierflow-default-decode"] = 1  # tierflow-default-decode-1's replica is given back already
    await actuator(kube, token).stop_node(record(), "decode", "tierflow-default-decode-1")
    assert kube.replicas["tierflow-default-decode"] == 1
    assert [entry[0] for entry in kube.log] == ["GET"]


def test_victims_are_the_highest_ordinals_whatever_their_load(kube: FakeKube, token: Path) -> None:
    act = actuator(kube, token)
    nodes = [NodeLoad(node_id="tierflow-default-decode-0"), NodeLoad(node_id="tierflow-default-decode-10", in_flight=9, prefix_cache_blocks=500),
             NodeLoad(node_id="tierflow-default-decode-2", in_flight=3), NodeLoad(node_id="decode-7")]  # fmt: skip
    assert act.choose_victims(record(), "decode", nodes, 2) == ["tierflow-default-decode-10", "tierflow-default-decode-2"]
    assert act.choose_victims(record(), "decode", nodes, 0) == []
    cordoned = [*nodes[:2], NodeLoad(node_id="tierflow-default-decode-2", cordoned=True)]
    assert act.choose_victims(record(), "decode", cordoned, 2) == ["tierflow-default-decode-10"], "never past an operator's cordon"
    assert act.choose_victims(record(), "prefill", nodes, 1) == []


async def test_errors_name_the_deployment_and_the_refusal(kube: FakeKube, token: Path) -> None:
    act = actuator(kube, token)
    with pytest.raises(ActuatorError, match=f"no StatefulSet {NS}/tierflow-default-decode"):
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


async def test_the_autoscaler_scales_a_statefulset_through_the_api(kube: FakeKube, token: Path) -> None:
    """The shell with this actuator: load on the one pod -> the StatefulSet is scaled, and the
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


async def test_the_autoscaler_drains_and_removes_the_pod_the_statefulset_removes(kube: FakeKube, token: Path) -> None:
    """Scale-down through the shell: of three idle pods, the cheapest by the default rule is
    -0 (coldest, oldest ... ) but the StatefulSet removes -2, so -2 is drained and stopped."""
    import asyncio

    kube.replicas["tierflow-default-decode"] = 3
    clock = VirtualClock(100.0)
    fleet = FleetView()
    fleet.put_deployment(record())
    published: list[messages.AutoscalerDecision] = []
    commands: list[tuple[str, str]] = []

    async def publish(data: bytes) -> None:
        published.append(messages.decision_decoder.decode(data))

    class DrainedAtOnce:
        async def command(self, node_id: str, action: str) -> messages.NodeCommandReply:
            commands.append((node_id, action))
            cordoned = action != "uncordon"
            return messages.NodeCommandReply(node_id=node_id, cordoned=cordoned, draining=cordoned, in_flight=0, cordon_owner="autoscaler" if cordoned else "")

    config = ScalingConfig(panic_window=0.0, stable_window=1.0, cooldown_up=0.0, cooldown_down=0.0, max_signal_age=5.0)
    scaler = Autoscaler(fleet, actuator(kube, token), DrainedAtOnce(), publish, clock, config, AutoscalerMetrics(CollectorRegistry()), drain_poll=0.01)
    cache = {"tierflow-default-decode-0": 0, "tierflow-default-decode-1": 10, "tierflow-default-decode-2": 500}  # -2 the warmest
    for _ in range(4):
        for node_id, blocks in cache.items():
            fleet.heard(messages.NodeHeartbeat(node_id=node_id, deployment="default", max_batch=8, prefix_cache_blocks=blocks), clock.monotonic())
        await scaler.tick()
        clock.advance(0.5)
    down = [d for d in published if d.action == "down"]
    assert down and down[0].victims == ["tierflow-default-decode-2"]

    async def given_back() -> None:
        while kube.replicas["tierflow-default-decode"] != 2:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(given_back(), 10)
    assert ("tierflow-default-decode-2", "drain") in commands and all(node == "tierflow-default-decode-2" for node, _ in commands)
    await scaler.close()


def test_the_audited_actuator_keeps_the_victim_choice(kube: FakeKube, token: Path) -> None:
    """The service wraps its actuator for the audit stream; the wrapper must still let the
    StatefulSet's ordinals decide, or scale-down would drain a node Kubernetes keeps."""
    from tierflow.runtime.audit import AuditLog
    from tierflow.services.autoscaler.actuators import ChoosesVictims, SupportsInventory
    from tierflow.services.autoscaler.audited import AuditedActuator

    class Recorder:
        def record(self, *args: object, **kwargs: object) -> None:
            pass

    wrapped = AuditedActuator.wrap(actuator(kube, token), cast(AuditLog, Recorder()), "autoscaler")
    assert isinstance(wrapped, ChoosesVictims) and isinstance(wrapped, SupportsInventory)
    nodes = [NodeLoad(node_id=f"tierflow-default-decode-{i}") for i in range(3)]
    assert wrapped.choose_victims(record(), "decode", nodes, 1) == ["tierflow-default-decode-2"]
