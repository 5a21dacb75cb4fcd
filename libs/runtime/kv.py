"""JetStream KV helpers: open-or-create a bucket, and follow it as a live cache.

`follow` implements the read side every watcher in the fabric needs (router, nodes,
autoscaler): replay the latest value of every key, tell the caller the snapshot is
complete, then apply changes (deletes included) as they happen, and re-establish the
watch if the server restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError, NotFoundError, ServerError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

__all__ = ["open_bucket", "follow", "snapshot"]

log = logging.getLogger(__name__)
_REPLICAS_NEED_CLUSTER = 10074  # JetStream: "replicas > 1 not supported in non-clustered mode"


async def open_bucket(js: JetStreamContext, bucket: str, *, create: bool = False, history: int = 10, replicas: int = 1) -> KeyValue:
    """The bucket; with create=True it is made (file storage) when missing."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        if not create:
            raise
        config = KeyValueConfig(bucket=bucket, history=history, storage=StorageType.FILE, replicas=replicas)
        try:
            return await js.create_key_value(config)
        except ServerError as exc:
            if replicas <= 1 or exc.err_code != _REPLICAS_NEED_CLUSTER:
                raise
            # A single server (a laptop, a test) cannot keep copies: say so, keep one.
            log.warning("NATS is not clustered: bucket %s gets 1 replica instead of %d", bucket, replicas)
            return await js.create_key_value(replace(config, replicas=1))


async def snapshot(js: JetStreamContext, bucket: str, keys: str = ">") -> list[KeyValue.Entry]:
    """The latest live entry of every key matching `keys` (a subject pattern), complete.

    The key list comes from the server (the KV stream's per-subject state), then each key
    is read: exact, unlike a watch, whose end-of-snapshot marker nats-py can deliver
    before entries it has already received. (nats-py's `keys(filters=...)` matches
    filters as substrings.) Costs one request per key: for registry-sized buckets.
    """
    try:
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{keys}")
    except NotFoundError:
        return []
    kv = await js.key_value(bucket)
    prefix = len(f"$KV.{bucket}.")
    entries = []
    for subject in sorted(info.state.subjects or {}):
        try:
            entries.append(await kv.get(subject[prefix:]))
        except (KeyDeletedError, KeyNotFoundError):
            continue  # a delete or purge marker is the latest message of that key
    return entries


OnPut = Callable[[str, bytes, int], Awaitable[None] | None]
OnDelete = Callable[[str], Awaitable[None] | None]


async def _call(fn: Callable[..., Awaitable[None] | None], *args: object) -> None:
    result = fn(*args)
    if result is not None:
        await result


async def follow(
    js: JetStreamContext,
    bucket: str,
    keys: str,
    *,
    on_put: OnPut,
    on_delete: OnDelete,
    on_snapshot: Callable[[], None] | None = None,
    stopping: asyncio.Event,
    retry_delay: float = 0.5,
) -> None:
    """Mirror `keys` of `bucket` into the caller's callbacks until `stopping` is set."""
    snapshot_announced = False
    while not stopping.is_set():
        try:
            kv = await open_bucket(js, bucket)
            watcher = await kv.watch(keys)
        except Exception as exc:  # bucket not made yet, server restarting, ...
            log.debug("watch %s/%s not ready: %s", bucket, keys, exc)
            await asyncio.sleep(retry_delay)
            continue
        try:
            while not stopping.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except asyncio.TimeoutError:  # nats-py's TimeoutError subclasses it
                    continue
                if entry is None:
                    if not snapshot_announced and on_snapshot is not None:
                        on_snapshot()
                    snapshot_announced = True
                    continue
                if entry.operation in (KV_DEL, KV_PURGE):
                    await _call(on_delete, entry.key)
                elif entry.value is not None:
                    await _call(on_put, entry.key, entry.value, entry.revision or 0)
        except Exception as exc:
            log.warning("watch of %s/%s broke (%s); re-watching", bucket, keys, exc)
            await asyncio.sleep(retry_delay)
        finally:
            try:
                await watcher.stop()
            except Exception:
                pass
