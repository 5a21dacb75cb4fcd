"""runtime.kv's atomic batches and whole reads against a real nats-server: a batch is
stored whole or not at all, a snapshot never straddles one, and an existing bucket is
upgraded to take them."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from tierflow.runtime.kv import BatchConflict, BatchTooLarge, KVWrite, commit_batch, open_bucket, snapshot


@pytest.fixture
def bucket() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def test_a_batch_is_stored_whole_with_consecutive_revisions(nats_client, bucket: str) -> None:
    js = nats_client.jetstream()
    kv = await open_bucket(js, bucket, create=True, atomic=True)
    await kv.put("model.old", b"x")
    revisions = await commit_batch(js, bucket, [KVWrite("model.a", b"1", 0), KVWrite("model.b", b"2", 0), KVWrite("model.old", None, 1)])
    assert revisions == [2, 3, 4]
    assert [(await kv.get(k)).revision for k in ("model.a", "model.b")] == [2, 3]
    entries = {e.key: (e.value, e.revision, e.operation) for e in await snapshot(js, bucket, deleted=True)}
    assert entries == {"model.a": (b"1", 2, None), "model.b": (b"2", 3, None), "model.old": (None, 4, "DEL")}
    # Writing a deleted key again names its delete marker's revision.
    assert await commit_batch(js, bucket, [KVWrite("model.old", b"back", 4)]) == [5]


async def test_one_failed_compare_and_set_rejects_the_whole_batch(nats_client, bucket: str) -> None:
    js = nats_client.jetstream()
    kv = await open_bucket(js, bucket, create=True, atomic=True)
    await kv.put("a", b"1")
    with pytest.raises(BatchConflict):
        await commit_batch(js, bucket, [KVWrite("b", b"new", 0), KVWrite("a", b"new", 7)])
    with pytest.raises(BatchConflict):
        await commit_batch(js, bucket, [KVWrite("a", b"new", 0)])  # exists: not a create
    assert {e.key: e.value for e in await snapshot(js, bucket)} == {"a": b"1"}


async def test_a_batch_larger_than_the_server_takes_is_refused_before_anything_is_sent(nats_client, bucket: str) -> None:
    js = nats_client.jetstream()
    await open_bucket(js, bucket, create=True, atomic=True)
    with pytest.raises(BatchTooLarge, match="1001 writes in one atomic batch; the NATS server takes at most 1000"):
        await commit_batch(js, bucket, [KVWrite(f"k{i}", b"v") for i in range(1001)])
    assert (await js.stream_info(f"KV_{bucket}")).state.messages == 0
    assert len(await commit_batch(js, bucket, [KVWrite(f"k{i}", b"v") for i in range(1000)])) == 1000


async def test_an_existing_bucket_is_upgraded_to_take_batches(nats_client, bucket: str) -> None:
    js = nats_client.jetstream()
    kv = await open_bucket(js, bucket, create=True)
    await kv.put("a", b"1")
    assert not (await js.stream_info(f"KV_{bucket}")).config.allow_atomic
    await open_bucket(js, bucket, create=True, atomic=True, replicas=3)  # a single server keeps 1 replica, quietly
    info = await js.stream_info(f"KV_{bucket}")
    assert info.config.allow_atomic and info.config.num_replicas == 1 and info.state.messages == 1
    assert await commit_batch(js, bucket, [KVWrite("a", b"2", 1)]) == [2]


async def test_a_snapshot_never_straddles_a_batch(nats_url: str, bucket: str) -> None:
    """A writer rewrites 40 keys in batches while snapshots are read: every snapshot holds
    one generation only (a read that a batch landed in is read again)."""
    writer, reader = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        wjs, rjs = writer.jetstream(), reader.jetstream()
        await open_bucket(wjs, bucket, create=True, atomic=True)
        keys = [f"model.m{i:02}" for i in range(40)]
        await commit_batch(wjs, bucket, [KVWrite(k, b"gen-0") for k in keys])
        done = asyncio.Event()

        async def write() -> None:
            for gen in range(1, 41):
                await commit_batch(wjs, bucket, [KVWrite(k, f"gen-{gen}".encode()) for k in keys])
                await asyncio.sleep(0.02)  # pacing, so that some reads find a quiet moment
            done.set()

        task = asyncio.create_task(write())
        reads = 0
        while not done.is_set():
            entries = await snapshot(rjs, bucket, "model.>")
            assert sorted(e.key for e in entries) == keys
            generations = {e.value for e in entries}
            assert len(generations) == 1, f"a read straddled a batch: {sorted(generations)}"
            reads += 1
        await task
        assert reads > 3
    finally:
        await writer.close()
        await reader.close()


async def test_a_batch_cut_short_in_the_stream_is_read_as_it_is(nats_url: str, bucket: str) -> None:
    """A stream that ends inside a batch and stays so (what a server dying mid-append could
    leave) does not stall readers: snapshots and watches take what is stored."""
    from tierflow.runtime.kv import follow
    from tierflow.runtime.kv_batch import BATCH_HEADER

    nc = await nats.connect(nats_url)
    stopping = asyncio.Event()
    try:
        js = nc.jetstream()
        kv = await open_bucket(js, bucket, create=True, atomic=True)
        await kv.put("a", b"1")
        view: dict[str, bytes] = {}
        synced = asyncio.Event()
        task = asyncio.create_task(follow(js, bucket, ">", on_put=lambda k, v, r: view.__setitem__(k, v), on_delete=view.pop,
                                          on_snapshot=synced.set, stopping=stopping))  # fmt: skip
        await asyncio.wait_for(synced.wait(), 10)
        await js.publish(f"$KV.{bucket}.b", b"2", headers={BATCH_HEADER: "cut 1/2"})  # position 1 of 2, and no 2
        async with asyncio.timeout(10):
            while view.get("b") != b"2":
                await asyncio.sleep(0.05)
        entries = await asyncio.wait_for(snapshot(js, bucket), 10)
        assert {e.key: e.value for e in entries} == {"a": b"1", "b": b"2"}
        late: dict[str, bytes] = {}  # a watch that starts on it finishes its snapshot too
        late_synced = asyncio.Event()
        late_task = asyncio.create_task(follow(js, bucket, ">", on_put=lambda k, v, r: late.__setitem__(k, v), on_delete=late.pop,
                                               on_snapshot=late_synced.set, stopping=stopping))  # fmt: skip
        await asyncio.wait_for(late_synced.wait(), 10)
        assert late == {"a": b"1", "b": b"2"}
        stopping.set()
        await asyncio.wait_for(asyncio.gather(task, late_task), 10)
    finally:
        stopping.set()
        await nc.close()
