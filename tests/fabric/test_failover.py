"""A decode node dying mid-request: retried before the first token, resumed after it.

Runs its own `tierflow up` (it kills nodes) with a 405B model, whose prefill on the
emulator takes long enough to kill the serving node between dispatch and first token,
and whose decode (~130 tokens/s) is slow enough to kill it mid-stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import nats
import openai
import pytest

from tierflow.contracts import messages, subjects
from tierflow.v1 import inference_pb2 as pb
from tierflow.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-405b"
LONG_PROMPT = "Summarize the quarterly report. " * 700  # ~4,200 tokens: a slow prefill


@pytest.fixture(scope="module")
def big_fabric(tmp_path_factory: pytest.TempPathFactory, fabric_factory, repo_root):
    # Four nodes, none replaced (no restarts, an advisory autoscaler): each test kills one or
    # more, and the last one needs every node gone. No NATS auth: `NodeWatch` reads every
    # node's work subject (prompts included) to see where a request went, which no identity may.
    running = fabric_factory(
        tmp_path_factory.mktemp("failover"), "--fleet", str(repo_root / "tests/fleets/failover.yaml"), "--deployment", "big",
        "--decode-nodes", "4", "--prefill-nodes", "0", "--no-restart", "--actuator", "none", "--no-nats-auth",
    )  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


class NodeWatch:
    """Learns node pids from heartbeats and sees which node each request is sent to."""

    def __init__(self, nats_url: str) -> None:
        self.pids: dict[str, int] = {}
        self.dispatched: list[str] = []
        self.first_dispatch = threading.Event()
        self._url = nats_url
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _run(self) -> None:
        nc = await nats.connect(self._url)
        self._stop = asyncio.Event()

        async def beat(msg) -> None:
            hb = messages.heartbeat_decoder.decode(msg.data)
            self.pids[hb.node_id] = hb.pid

        async def dispatched(msg) -> None:
            self.dispatched.append(msg.subject.rsplit(".", 1)[1])
            self.first_dispatch.set()

        await nc.subscribe(subjects.NODE_HEARTBEATS, cb=beat)
        await nc.subscribe(subjects.node_generate("*"), cb=dispatched)
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def wait_for_nodes(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.pids) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.pids) >= n, self.pids

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # killed by an earlier test
        pass


def _wait_live_nodes(fabric, n: int, timeout: float = 30.0) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{fabric.host}:{fabric.http_port}/health", timeout=2) as r:
                if json.loads(r.read())["nodes"] >= n:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"fabric did not get back to {n} live nodes")


def test_node_killed_before_first_token_is_retried_on_the_other(big_fabric) -> None:
    _wait_live_nodes(big_fabric, 4)
    watch = NodeWatch(big_fabric.nats_url)
    try:
        watch.wait_for_nodes(4)
        client = openai.OpenAI(base_url=big_fabric.base_url, api_key="k", max_retries=0, timeout=60)
        result: dict = {}

        def call() -> None:
            try:
                stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=8, seed=1, stream=True)
                result["text"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            except Exception as exc:  # surfaced by the assertion below
                result["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        assert watch.first_dispatch.wait(20), "the request never reached a node"
        victim = watch.dispatched[0]
        _kill(watch.pids[victim])
        caller.join(60)
        assert not caller.is_alive(), "the client hung"
        assert "error" not in result, result.get("error")
        assert result["text"], "no tokens after the retry"
        assert len(watch.dispatched) >= 2 and watch.dispatched[1] != victim, watch.dispatched
    finally:
        watch.close()


STORY = [{"role": "user", "content": "Write a long story."}]


def _stream_text(client: openai.OpenAI, *, on_token=None, max_tokens: int = 300) -> tuple[str, int]:
    """A streamed chat completion's text and its usage's completion tokens."""
    stream = client.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=max_tokens, seed=7, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    parts, usage, got = [], 0, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            # Tokens so far: the emulator's output tokens are one space-led word each, and
            # the router sends tokens that arrived together in one chunk.
            got += chunk.choices[0].delta.content.count(" ")
            if on_token is not None:
                on_token(got)
    return "".join(parts), usage


def _migrated_record(fabric, timeout: float = 5.0) -> dict:
    """The newest record of a migrated request (records are written once per router loop
    turn: the one for a stream just read may land a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        migrated = [r for r in fabric.request_records(timeout=0) if r.get("migrations")]
        if migrated or time.monotonic() >= deadline:
            assert migrated, "no record of a migrated request"
            return migrated[-1]
        time.sleep(0.05)


def test_node_killed_mid_stream_is_resumed_elsewhere_and_the_client_sees_one_stream(big_fabric) -> None:
    """The exact stream an undisturbed run gives, with the serving node SIGKILLed 30 tokens in."""
    _wait_live_nodes(big_fabric, 2)
    watch = NodeWatch(big_fabric.nats_url)
    try:
        watch.wait_for_nodes(2)
        client = openai.OpenAI(base_url=big_fabric.base_url, api_key="k", max_retries=0, timeout=60)
        reference, reference_tokens = _stream_text(client)
        killed: list[str] = []

        def kill_at_30(got: int) -> None:
            if got >= 30 and not killed:
                killed.append(watch.dispatched[-1])
                _kill(watch.pids[killed[0]])

        started = time.monotonic()
        text, tokens = _stream_text(client, on_token=kill_at_30)
        assert killed, "the stream ended before the kill"
        assert time.monotonic() - started < 30
        assert (text, tokens) == (reference, reference_tokens) and tokens == 300
        assert watch.dispatched[-1] != killed[0]
        record = _migrated_record(big_fabric)
        assert record["migrations"] == 1 and record["outcome"] == "ok" and record["nodes_tried"][0] == killed[0]
    finally:
        watch.close()


def test_grpc_streams_are_resumed_too(big_fabric) -> None:
    _wait_live_nodes(big_fabric, 2)
    watch = NodeWatch(big_fabric.nats_url)
    try:
        watch.wait_for_nodes(2)
        request = pb.GenerateRequest(model=MODEL, prompt="Once upon a time", max_tokens=200, seed=3, ignore_eos=True)
        with grpc.insecure_channel(f"{big_fabric.host}:{big_fabric.grpc_port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            reference = [c.token_ids for c in stub.Generate(request, timeout=60)]
            resumed, killed = [], []
            for chunk in stub.Generate(request, timeout=60):
                resumed.append(chunk.token_ids)
                if sum(map(len, resumed)) >= 20 and not killed:  # tokens, not chunks: one may carry several
                    killed.append(watch.dispatched[-1])
                    _kill(watch.pids[killed[0]])
        assert killed
        flat = [t for ids in resumed for t in ids]
        assert flat == [t for ids in reference for t in ids] and len(flat) == 200
    finally:
        watch.close()


def test_with_no_node_left_a_broken_stream_is_a_clear_error(big_fabric) -> None:
    _wait_live_nodes(big_fabric, 1)
    watch = NodeWatch(big_fabric.nats_url)
    try:
        watch.wait_for_nodes(1)
        client = openai.OpenAI(base_url=big_fabric.base_url, api_key="k", max_retries=0, timeout=60)
        started = time.monotonic()

        killed: list[int] = []

        def kill_all_at_5(got: int) -> None:
            if got >= 5 and not killed:
                killed.append(got)
                for pid in set(watch.pids.values()):
                    _kill(pid)

        with pytest.raises(openai.APIError) as err:
            _stream_text(client, on_token=kill_all_at_5, max_tokens=2000)
        assert time.monotonic() - started < 20, "the error took too long: the client was left hanging"
        assert "incomplete" in str(err.value.message)
    finally:
        watch.close()
