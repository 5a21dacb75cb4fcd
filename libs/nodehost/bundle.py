"""What a node serves: its deployment's bundle, read from the registry's KV bucket.

A node is started with only a deployment name; the registry is the one place that says
which models (and versions and configurations) that deployment bundles. The node waits
for the record to exist, so nodes may start before the registry has applied its fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from tierflow.contracts import registry, subjects
from tierflow.nodehost.specs import bundle_from_records
from tierflow.rdu import BundleModel, load_catalog
from tierflow.runtime.kv import follow, open_bucket
from tierflow.runtime.waiting import first

__all__ = ["fetch_deployment", "build_bundle", "describe_bundle", "watch_bundle"]

log = logging.getLogger(__name__)


async def _get(js: JetStreamContext, key: str) -> bytes | None:
    try:
        kv = await open_bucket(js, subjects.REGISTRY_BUCKET)
        return (await kv.get(key)).value
    except (BucketNotFoundError, KeyNotFoundError):
        return None


async def fetch_deployment(js: JetStreamContext, name: str, stopping: asyncio.Event, *, timeout: float = 60.0) -> registry.DeploymentRecord:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await _get(js, subjects.deployment_key(name))
        if value is not None:
            return registry.deployment_decoder.decode(value)
        if stopping.is_set() or loop.time() > deadline:
            raise LookupError(f"deployment {name!r} is not in the registry (apply a fleet file that declares it)")
        log.info("waiting for deployment %r in the registry", name)
        await asyncio.sleep(0.5)


async def build_bundle(js: JetStreamContext, deployment: registry.DeploymentRecord) -> list[BundleModel]:
    """The emulator's view of the bundle, from the model records in the registry."""
    models = {}
    for entry in deployment.models:
        value = await _get(js, subjects.model_key(entry.model))
        if value is not None:
            models[entry.model] = registry.model_decoder.decode(value)
    return bundle_from_records(deployment, models, load_catalog(None))


async def watch_bundle(
    js: JetStreamContext,
    deployment: registry.DeploymentRecord,
    serving: Sequence[BundleModel],
    on_outdated: Callable[[bool, str], None],
    stopping: asyncio.Event,
) -> None:
    """Tell `on_outdated(True, what)` when the registry's bundle for this node's deployment
    stops being the one it serves (`what` says how), and `(False, "")` when it is again.

    Nodes do not reload a bundle in place (a drain and a restart does that); this makes
    the difference visible instead of silent: a warning, the heartbeat's `bundle_outdated`
    and `tierflow status`. The deployment key and every model key are followed, since a
    model record (a version's spec) changes what the bundle is, too.
    """
    changed = asyncio.Event()

    def on_put(key: str, value: bytes, revision: int) -> None:
        if key == subjects.deployment_key(deployment.name) or key.startswith("model."):
            changed.set()

    def on_delete(key: str) -> None:
        on_put(key, b"", 0)

    watch = asyncio.create_task(follow(js, subjects.REGISTRY_BUCKET, ">", on_put=on_put, on_delete=on_delete, stopping=stopping), name="bundle-watch")
    outdated = False
    try:
        while not stopping.is_set():
            await first(changed.wait(), stopping.wait())
            if stopping.is_set():
                break
            changed.clear()
            what = await _difference(js, deployment, serving)
            if bool(what) != outdated:
                outdated = bool(what)
                on_outdated(outdated, what)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def _difference(js: JetStreamContext, started: registry.DeploymentRecord, serving: Sequence[BundleModel]) -> str:
    """How the registry's bundle for the deployment differs from what the node started
    with (`started`'s profile, `serving`), or "" when it does not."""
    name = started.name
    value = await _get(js, subjects.deployment_key(name))
    if value is None:
        return f"deployment {name!r} was deleted from the registry"
    record = registry.deployment_decoder.decode(value)
    try:
        bundle = await build_bundle(js, record)
    except (LookupError, ValueError) as exc:
        return f"the registry's bundle for {name!r} cannot be built ({exc})"
    if record.profile != started.profile:
        return f"profile {started.profile!r} -> {record.profile!r}"
    if bundle != list(serving):
        return f"{describe_bundle(serving)} -> {describe_bundle(bundle)}"
    return ""


def describe_bundle(bundle: Sequence[BundleModel]) -> str:
    """`llama-3.1-8b v1 (ss8192-bs4), ...`: what a node serves, as logs and warnings say it."""
    return ", ".join(f"{b.name} {b.version} ({b.config})" for b in bundle)
