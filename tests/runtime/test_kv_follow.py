"""runtime.kv.follow against a real nats-server: it rides out a server restart (back within
2 s of the client reconnecting, converged to the bucket), a bucket deleted and recreated,
and callbacks that raise; an atomic batch reaches it whole, and a batch never committed
reaches it not at all."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import uuid
from collections.abc import Callable

import nats
import pytest
from nats.aio.client import Client as NATS

from tierflow.runtime.kv import KVWrite, commit_batch, follow, open_bucket, snapshot
from tierflow.runtime.kv_batch import BATCH_HEADER
from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port

View = dict[str, bytes]


class Mirror:
    """What a follower's caller holds, with a way to wait for a condition on it."""

    def __init__(self) -> None:
        self.view: View = {}
        self.seen_at: dict[str, float] = {}
        self.snapshots = 0
        self.groups = 0
        self._changed = asyncio.Event()
        self._listeners: list[asyncio.Event] = []
        self._time = asyncio.get_running_loop().time

    def listen(self) -> asyncio.Event:
        """An event set by every callback, for one other task to wait on."""
        self._listeners.append(asyncio.Event())
        return self._listeners[-1]

    def _wake(self) -> None:
        self._changed.set()
        for event in self._listeners:
            event.set()

    def on_put(self, key: str, value: bytes, revision: int) -> None:
        self.view[key] = value
        self.seen_at[key] = self._time()
        self._wake()

    def on_delete(self, key: str) -> None:
        self.view.pop(key, None)
        self._wake()

    def on_snapshot(self) -> None:
        self.snapshots += 1

    def on_applied(self) -> None:
        self.groups += 1

    async def until(self, predicate: Callable[[View], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.view):
                self._changed.clear()
                await self._changed.wait()


async def following(js, bucket: str, mirror: Mirror, stopping: asyncio.Event, keys: str = ">", **kw) -> asyncio.Task[None]:
    task = asyncio.create_task(follow(js, bucket, keys, on_put=mirror.on_put, on_delete=mirror.on_delete, on_snapshot=mirror.on_snapshot,
                                      on_applied=mirror.on_applied, stopping=stopping, **kw))  # fmt: skip
    async with asyncio.timeout(20):
        while mirror.snapshots == 0:
            assert not task.done(), task
            await asyncio.sleep(0.01)
    return task


async def stop(task: asyncio.Task[None], stopping: asyncio.Event) -> None:
    stopping.set()
    await asyncio.wait_for(task, 10)


@pytest.fixture
def bucket() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- outages


async def test_follow_is_back_within_2s_of_a_reconnect_and_converges(tmp_path: pathlib.Path) -> None:
    """Stop the server and start it again (same port, same store): a key deleted while the
    follower was away is reported deleted, one added is put, and a put made after the
    follower's client reconnected is seen within 2 s of that reconnect."""
    loop = asyncio.get_running_loop()
    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="kv-follow")
    server = NatsServerProcess(config, tmp_path / "nats-1.log")
    await server.start()
    await server.wait_ready()
    reconnects: list[float] = []

    async def on_reconnect() -> None:
        reconnects.append(loop.time())

    # The follower's client retries every second, so the writer below gets in first.
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=1.0, reconnected_cb=on_reconnect)
    writer: NATS | None = None
    stopping = asyncio.Event()
    try:
        kv = await open_bucket(nc.jetstream(), "fleet", create=True)
        for key in ("a", "b", "c"):
            await kv.put(key, key.encode())
        mirror = Mirror()
        task = await following(nc.jetstream(), "fleet", mirror, stopping)
        assert mirror.view == {"a": b"a", "b": b"b", "c": b"c"}

        await server.stop()
        server = NatsServerProcess(config, tmp_path / "nats-2.log")
        await server.start()
        await server.wait_ready()
        writer = await nats.connect(server.url)
        wkv = await writer.jetstream().key_value("fleet")
        await wkv.delete("b")
        await wkv.put("d", b"d")
        deleted_at = loop.time()

        async with asyncio.timeout(30):
            while not reconnects:
                await asyncio.sleep(0.01)
        assert deleted_at < reconnects[0], "the follower reconnected before the delete: the test proves less than it should"
        await wkv.put("e", b"e")
        await mirror.until(lambda v: "e" in v)
        assert mirror.seen_at["e"] - reconnects[0] < 2.0, f"put seen {mirror.seen_at['e'] - reconnects[0]:.2f}s after the reconnect"
        await mirror.until(lambda v: v == {"a": b"a", "c": b"c", "d": b"d", "e": b"e"})
        assert mirror.snapshots == 1 and not task.done()
        await stop(task, stopping)
    finally:
        stopping.set()
        for client in (nc, writer):
            if client is not None:
                await client.close()
        await server.stop()


async def test_a_bucket_deleted_and_recreated_converges(nats_url: str, bucket: str) -> None:
    nc = await nats.connect(nats_url)
    stopping = asyncio.Event()
    try:
        js = nc.jetstream()
        kv = await open_bucket(js, bucket, create=True)
        for key in ("model.a", "model.b", "deployment.d"):
            await kv.put(key, b"old")
        mirror = Mirror()
        task = await following(js, bucket, mirror, stopping)
        assert set(mirror.view) == {"model.a", "model.b", "deployment.d"}

        await js.delete_key_value(bucket)
        kv = await open_bucket(js, bucket, create=True)
        await kv.put("model.x", b"new")
        await kv.put("model.a", b"new")
        await kv.delete("model.x")
        await kv.put("model.y", b"new")
        await mirror.until(lambda v: v == {"model.a": b"new", "model.y": b"new"})
        assert mirror.snapshots == 1 and not task.done()
        await stop(task, stopping)
    finally:
        stopping.set()
        await nc.close()


async def test_a_watch_that_starts_before_its_bucket_waits_for_it(nats_url: str, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    nc = await nats.connect(nats_url)
    stopping = asyncio.Event()
    mirror = Mirror()
    try:
        with caplog.at_level(logging.DEBUG, logger="tierflow.runtime.kv_watch"):
            task = asyncio.create_task(follow(nc.jetstream(), bucket, ">", on_put=mirror.on_put, on_delete=mirror.on_delete,
                                              on_snapshot=mirror.on_snapshot, stopping=stopping))  # fmt: skip
            async with asyncio.timeout(10):  # several failed attempts
                while sum("still down" in r.getMessage() for r in caplog.records) < 2:
                    await asyncio.sleep(0.05)
            kv = await open_bucket(nc.jetstream(), bucket, create=True)
            await kv.put("k", b"v")
            await mirror.until(lambda v: v == {"k": b"v"})
        down = [r for r in caplog.records if r.levelno >= logging.WARNING and "is down" in r.getMessage()]
        assert len(down) == 1, "an outage is logged once, not per attempt"
        assert any("resumed after" in r.getMessage() for r in caplog.records)
        assert mirror.snapshots == 1
        await stop(task, stopping)
    finally:
        stopping.set()
        await nc.close()


async def test_a_callback_that_raises_is_logged_and_the_watch_goes_on(nats_url: str, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    nc = await nats.connect(nats_url)
    stopping = asyncio.Event()
    mirror = Mirror()

    def on_put(key: str, value: bytes, revision: int) -> None:
        if value == b"boom":
            raise RuntimeError("a bug in the caller")
        mirror.on_put(key, value, revision)

    try:
        kv = await open_bucket(nc.jetstream(), bucket, create=True)
        task = asyncio.create_task(follow(nc.jetstream(), bucket, ">", on_put=on_put, on_delete=mirror.on_delete, stopping=stopping))
        await kv.put("a", b"boom")
        await kv.put("b", b"fine")
        await mirror.until(lambda v: v == {"b": b"fine"})
        assert any("a bug in the caller" in (r.exc_text or "") or "callback" in r.getMessage() for r in caplog.records)
        assert not task.done()
        await stop(task, stopping)
    finally:
        stopping.set()
        await nc.close()


# ---------------------------------------------------------------------------- batches


async def test_a_batch_reaches_the_follower_whole(nats_url: str, bucket: str) -> None:
    """Twenty batches, each rewriting 30 keys, with single writes between them: another
    task, woken by every put, never finds a batch half applied; neither does a follower
    whose filter hides part of each batch (its last message included)."""
    nc = await nats.connect(nats_url)
    stopping = asyncio.Event()
    try:
        js = nc.jetstream()
        kv = await open_bucket(js, bucket, create=True, atomic=True)
        keys = [f"model.m{i}" for i in range(20)] + [f"deployment.d{i}" for i in range(10)]
        revisions = await commit_batch(js, bucket, [KVWrite(k, b"gen-0", 0) for k in keys])
        everything, models = Mirror(), Mirror()
        tasks = [await following(js, bucket, everything, stopping), await following(js, bucket, models, stopping, keys="model.>")]
        mixed: list[set[bytes]] = []

        async def check(mirror: Mirror, prefix: str) -> None:
            woken = mirror.listen()
            while not stopping.is_set():
                await woken.wait()
                woken.clear()
                generations = {v for k, v in mirror.view.items() if k.startswith(prefix) and k != "model.single"}
                if len(generations) > 1:
                    mixed.append(generations)

        checkers = [asyncio.create_task(check(everything, "")), asyncio.create_task(check(models, "model."))]
        current = dict(zip(keys, revisions, strict=True))
        for gen in range(1, 21):
            revisions = await commit_batch(js, bucket, [KVWrite(k, f"gen-{gen}".encode(), current[k]) for k in keys])
            current = dict(zip(keys, revisions, strict=True))
            await kv.put("model.single", f"single-{gen}".encode())
        final = {k: b"gen-20" for k in keys} | {"model.single": b"single-20"}
        await everything.until(lambda v: v == final)
        await models.until(lambda v: v == {k: x for k, x in final.items() if k.startswith("model.")})
        assert mixed == []
        for task in checkers:
            task.cancel()
        for task in tasks:
            await stop(task, stopping)
    finally:
        stopping.set()
        await nc.close()


async def test_a_batch_without_its_commit_stores_nothing_and_reaches_no_reader(nats_url: str, bucket: str) -> None:
    """What a writer dying mid-batch leaves: the server keeps none of it, and a follower
    sees a later write without ever seeing the batch."""
    nc = await nats.connect(nats_url)
    stopping = asyncio.Event()
    try:
        js = nc.jetstream()
        kv = await open_bucket(js, bucket, create=True, atomic=True)
        await kv.put("model.a", b"before")
        mirror = Mirror()
        task = await following(js, bucket, mirror, stopping)
        batch_id = uuid.uuid4().hex
        for i, key in enumerate(["model.a", "model.b", "model.c"], 1):  # 3 of 4: no commit
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i), BATCH_HEADER: f"{batch_id} {i}/4"}
            await nc.publish(f"$KV.{bucket}.{key}", b"half", headers=headers)
        await nc.flush()
        await kv.put("sentinel", b"after")
        await mirror.until(lambda v: "sentinel" in v)
        assert mirror.view == {"model.a": b"before", "sentinel": b"after"}
        assert {e.key: e.value for e in await snapshot(js, bucket)} == {"model.a": b"before", "sentinel": b"after"}
        assert (await js.stream_info(f"KV_{bucket}")).state.messages == 2
        await stop(task, stopping)
    finally:
        stopping.set()
        await nc.close()


async def test_an_unexpected_error_is_logged_with_its_traceback_and_the_watch_restarts(nats_url: str, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    nc = await nats.connect(nats_url)
    stopping = asyncio.Event()
    mirror = Mirror()

    class Flaky:
        """The JetStream context, but making a consumer fails once with a bug's error."""

        def __init__(self, js) -> None:
            self._js = js
            self._nc = js._nc
            self.failed = False

        async def add_consumer(self, *args, **kw):
            if not self.failed:
                self.failed = True
                raise RuntimeError("a bug")
            return await self._js.add_consumer(*args, **kw)

        def __getattr__(self, name: str):
            return getattr(self._js, name)

    try:
        kv = await open_bucket(nc.jetstream(), bucket, create=True)
        await kv.put("k", b"v")
        flaky = Flaky(nc.jetstream())
        task = await following(flaky, bucket, mirror, stopping)
        assert flaky.failed and mirror.view == {"k": b"v"}
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and "is down" in r.getMessage()]
        assert len(errors) == 1 and errors[0].exc_info is not None and "a bug" in str(errors[0].exc_info[1])
        await kv.put("k2", b"v2")
        await mirror.until(lambda v: v == {"k": b"v", "k2": b"v2"})
        await stop(task, stopping)
    finally:
        stopping.set()
        await nc.close()


async def test_a_paused_server_leaves_no_deaf_connection(tmp_path: pathlib.Path) -> None:
    """The server paused (SIGSTOP) longer than the watch's stall limit, then resumed: the
    watch keeps its consumer and sees a put made after the resume within 2 s, and the
    client still hears plain messages. (A timed-out `nc.flush` here once left nats-py's
    read loop dead behind a connection that said it was connected, for 15-20 s.)"""
    import os
    import signal

    from tierflow.runtime.service import connect_nats

    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="kv-pause")
    server = NatsServerProcess(config, tmp_path / "nats.log")
    await server.start()
    await server.wait_ready()
    stopping = asyncio.Event()
    nc = await connect_nats(server.url, "pause-follower")
    writer = await nats.connect(server.url)
    try:
        name = f"t-{uuid.uuid4().hex[:8]}"
        kv = await open_bucket(writer.jetstream(), name, create=True)
        await kv.put("before", b"1")
        mirror = Mirror()
        task = await following(nc.jetstream(), name, mirror, stopping)
        heard = asyncio.Event()

        async def on_ping(msg: object) -> None:
            heard.set()

        await nc.subscribe("pause.ping", cb=on_ping)
        os.kill(server.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        await asyncio.sleep(4.0)  # past the watch's 2.5 s stall limit: it asks the server, which is silent
        os.kill(server.pid, signal.SIGCONT)  # type: ignore[arg-type]
        resumed = asyncio.get_running_loop().time()
        await kv.put("after", b"2")
        await mirror.until(lambda view: "after" in view, timeout=5.0)
        assert mirror.seen_at["after"] - resumed < 2.0
        await writer.publish("pause.ping", b"")
        await asyncio.wait_for(heard.wait(), 2.0)
        await stop(task, stopping)
    finally:
        stopping.set()
        await nc.close()
        await writer.close()
        await server.stop()
