"""`tierflow up --nats-cluster 3 --routers 2`: a fabric that survives losing a process.

One fabric for the module (it is the expensive part): a 3-server JetStream cluster, two
routers sharing one HTTP port, two decode nodes. The tests run in file order and kill
parts of it: both routers answer; a NATS member SIGKILLed under streamed requests is
restarted and the cluster is whole again while no request hangs; the registry and a
router SIGKILLed come back and the fabric serves again. DATA/children.json is how the
tests find what to kill and see the restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierflow.harness import Fabric
from tierflow.runtime.nats_server import meta_group, wait_cluster_ready

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
TOKENS = 24
# What a request may end with while a process dies: success, or a clear refusal/failure.
CLEAR_STATUSES = {429, 502, 503, 504}


@pytest.fixture(scope="module")
def cluster_fabric(tmp_path_factory: pytest.TempPathFactory, fabric_factory) -> Iterator[Fabric]:
    running = fabric_factory(tmp_path_factory.mktemp("cluster"), "--nats-cluster", "3", "--routers", "2",
                             "--decode-nodes", "2", "--prefill-nodes", "0", "--actuator", "none")  # fmt: skip
    try:
        yield running
    finally:
        pids = [c.pid for c in running.children()]
        assert running.stop() == 0
        assert running.children() == [] and not [pid for pid in pids if _alive(pid)]  # restarted ones too


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _client(fabric: Fabric) -> openai.OpenAI:
    """A client of its own, so its connection (and so its router) is picked afresh."""
    return openai.OpenAI(base_url=fabric.base_url, api_key="none", max_retries=0, timeout=60)


def _requests_served(fabric: Fabric, router: str) -> int:
    return sum(1 for line in fabric.log(router).splitlines() if '"msg":"request"' in line and '"status":200' in line)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0, state: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what} {state()}"
        time.sleep(0.1)


def _restarted(fabric: Fabric, name: str, restarts: int) -> Callable[[], bool]:
    def check() -> bool:
        child = fabric.child(name)
        return child.restarts >= restarts and child.state == "running"

    return check


def test_both_routers_serve_on_the_one_port(cluster_fabric: Fabric) -> None:
    fabric = cluster_fabric
    routers = [c for c in fabric.children() if c.role == "router"]
    assert [c.name for c in routers] == ["router-0", "router-1"] and len({c.pid for c in routers}) == 2
    ids = {json.loads(line)["router_id"] for name in ("router-0", "router-1") for line in fabric.log(name).splitlines()
           if '"router_id"' in line and "OpenAI on" in line}  # fmt: skip
    assert len(ids) == 2, ids  # each its own router id

    before = {name: _requests_served(fabric, name) for name in ("router-0", "router-1")}
    for i in range(24):  # a fresh connection each: the kernel spreads them over both
        reply = _client(fabric).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2,
                                                        extra_body={"ignore_eos": True})  # fmt: skip
        assert reply.usage is not None and reply.usage.completion_tokens == 2  # (without ignore_eos the emulator may end at 1)
    def served() -> dict[str, int]:
        return {name: _requests_served(fabric, name) - before[name] for name in before}

    _wait(lambda: sum(served().values()) == 24, "every request's record (written once per router loop turn)", timeout=5, state=served)
    assert all(n >= 1 for n in served().values()), served()


class StreamLoad:
    """A few threads streaming chat completions until stopped; every outcome recorded.

    Bounded in count and time, so it stops by itself; after a refusal a thread waits as
    the router asks (Retry-After, else 0.25 s), as a well-behaved client would.
    """

    def __init__(self, fabric: Fabric, threads: int = 4, limit: int = 600, seconds: float = 180.0) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self.unclear: list[str] = []
        self._fabric = fabric
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._left = limit
        self._until = time.monotonic() + seconds
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _one(self, client: openai.OpenAI, worker: int) -> float:
        """One streamed request, its outcome recorded; how long to wait before the next."""
        try:
            stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"story {worker}"}],
                                                    max_tokens=TOKENS, stream=True, stream_options={"include_usage": True})  # fmt: skip
            finish, usage = None, None
            for chunk in stream:
                finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
                usage = chunk.usage or usage
        except openai.APIStatusError as exc:
            clear = exc.status_code in CLEAR_STATUSES
            with self._lock:
                (self.failures if clear else self.unclear).append(f"{exc.status_code}: {exc.message}")
            return float(exc.response.headers.get("retry-after") or 0.25) if clear else 0.25
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            with self._lock:
                self.unclear.append(f"{type(exc).__name__}: {exc}")
            return 0.25
        except openai.APIError as exc:  # an SSE error event mid-stream: clear, if it says why
            with self._lock:
                (self.failures if exc.message else self.unclear).append(f"stream error: {exc.message}")
            return 0.25
        # The emulator may end a completion early ("stop"); "length" means every token asked for.
        complete = usage is not None and (finish == "stop" or (finish == "length" and usage.completion_tokens == TOKENS))
        with self._lock:
            if complete:
                self.ok += 1
            else:
                self.unclear.append(f"stream ended {finish!r} with {usage}")
        return 0.0

    def _run(self, worker: int) -> None:
        client = _client(self._fabric)
        while not self._stop.is_set() and time.monotonic() < self._until:
            with self._lock:
                if self._left <= 0:
                    return
                self._left -= 1
            pause = self._one(client, worker)
            if pause:
                self._stop.wait(min(pause, 2.0))

    def describe(self) -> str:
        with self._lock:
            return f"(ok {self.ok}, failed {self.failures[-5:]} of {len(self.failures)}, unclear {self.unclear[-5:]}, left {self._left})"

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        assert not any(t.is_alive() for t in self._threads), "a request hung"


def test_a_nats_member_killed_under_load_is_restarted_and_rejoins(cluster_fabric: Fabric) -> None:
    fabric = cluster_fabric
    members = fabric.nats_members()
    leader = asyncio.run(meta_group(members[0])).leader  # the hardest one to lose: the JetStream meta leader
    victim = fabric.child(leader)
    assert victim.role == "nats" and victim.restarts == 0

    load = StreamLoad(fabric)
    try:
        _wait(lambda: load.ok >= 8, "streams before the kill")
        os.kill(victim.pid, signal.SIGKILL)
        _wait(_restarted(fabric, leader, 1), f"{leader} restarted")
        asyncio.run(wait_cluster_ready(members, 60))  # every member healthy, one leader, all current
        served = load.ok
        _wait(lambda: load.ok >= served + 8, "streams after the member rejoined", state=load.describe)
    finally:
        load.stop()
    assert not load.unclear, load.unclear
    assert load.ok >= 16 and len(load.failures) <= load.ok, (load.ok, load.failures)
    assert fabric.child(leader).pid != victim.pid
    assert fabric.process.poll() is None  # the fabric never stopped


def _registry_serving(fabric: Fabric) -> bool:
    async def check() -> bool:
        async with grpc.aio.insecure_channel(f"{fabric.host}:{fabric.registry_grpc_port}") as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    return asyncio.run(check())


def _router_serves_again(fabric: Fabric, router: str) -> Callable[[], bool]:
    """True once `router`'s new process served a request (fresh connections reach either
    router; a 503 from the new one before it hears the nodes is allowed meanwhile)."""
    served = _requests_served(fabric, router)

    def check() -> bool:
        try:
            _client(fabric).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=2)
        except openai.APIStatusError as exc:
            assert exc.status_code in CLEAR_STATUSES, exc
        return _requests_served(fabric, router) > served

    return check


def test_the_registry_and_a_router_killed_come_back_and_the_fabric_serves(cluster_fabric: Fabric) -> None:
    fabric = cluster_fabric
    registry = fabric.child("model-registry")
    os.kill(registry.pid, signal.SIGKILL)
    _wait(_restarted(fabric, "model-registry", registry.restarts + 1), "the registry restarted")
    _wait(lambda: _registry_serving(fabric), "the restarted registry serving gRPC")

    router = fabric.child("router-0")
    os.kill(router.pid, signal.SIGKILL)
    _wait(_restarted(fabric, "router-0", router.restarts + 1), "router-0 restarted")
    _wait(_router_serves_again(fabric, "router-0"), "the restarted router-0 serving")
    with urllib.request.urlopen(f"http://{fabric.host}:{fabric.http_port}/health", timeout=5) as reply:
        assert json.loads(reply.read())["status"] == "ok"

    children = {c.name: c for c in fabric.children()}
    assert children["model-registry"].restarts == registry.restarts + 1 and children["model-registry"].pid != registry.pid
    assert children["router-0"].restarts == router.restarts + 1 and children["router-0"].pid != router.pid
    assert children["router-1"].restarts == 0 and all(c.state == "running" for c in children.values())
    stderr = (fabric.data_dir / "up.out").read_text()
    assert f"model-registry (pid {registry.pid}) was killed by SIGKILL; restarting it in" in stderr
    assert f"restarted router-0 (pid {children['router-0'].pid}, restart {router.restarts + 1})" in stderr
    assert '"msg":"restarted model-registry' in fabric.log("up")
