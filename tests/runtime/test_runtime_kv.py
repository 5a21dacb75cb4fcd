"""runtime.kv against a real JetStream: snapshots are complete, deletes are honoured."""

from __future__ import annotations

import uuid

from tierflow.runtime.kv import open_bucket, snapshot


async def test_snapshot_is_complete_filtered_and_skips_deleted(nats_client) -> None:
    js = nats_client.jetstream()
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    kv = await open_bucket(js, bucket, create=True)
    for i in range(40):
        await kv.put(f"model.m{i}", f"v{i}".encode())
    await kv.put("deployment.d", b"x")
    await kv.put("model.m3", b"v3-new")
    await kv.delete("model.m5")
    entries = await snapshot(js, bucket, "model.>")
    assert sorted(e.key for e in entries) == sorted(f"model.m{i}" for i in range(40) if i != 5)
    assert next(e for e in entries if e.key == "model.m3").value == b"v3-new"
    assert await snapshot(js, bucket, "nothing.>") == []
    assert await snapshot(js, "no-such-bucket") == []
