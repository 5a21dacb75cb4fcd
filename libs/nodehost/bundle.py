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
from nats.js.errors import BucketNotFoundError

from tierflow.contracts import registry, subjects
from tierflow.nodehost.specs import bundle_from_records
from tierflow.rdu import BundleModel, load_catalog
from tierflow.runtime.kv import follow, snapshot
from tierflow.runtime.waiting import first

__all__ = ["fetch_bundle", "describe_bundle", "watch_bundle"]

log = logging.getLogger(__name__)


async def _read(js: JetStreamContext, deployment: str) -> tuple[registry.DeploymentRecord | None, dict[str, registry.ModelRecord]]:
    """The deployment's record and every model record, from one consistent read of the
    bucket (a record read key by key could straddle an apply: a new deployment with the
    old models)."""
    try:
        entries = await snapshot(js, subjects.REGISTRY_BUCKET)
    except BucketNotFoundError:
        return None, {}
    record: registry.DeploymentRecord | None = None
    models: dict[str, registry.ModelRecord] = {}
    wanted = subjects.deployment_key(deployment)
    for entry in entries:
        if entry.value is None:
            continue
        if entry.key == wanted:
            record = registry.deployment_decoder.decode(entry.value)
        elif entry.key.startswith(subjects.model_key("")):
            model = registry.model_decoder.decode(entry.value)
            models[model.name] = model
    return record, models


def _bundle(record: registry.DeploymentRecord, models: dict[str, registry.ModelRecord]) -> list[BundleModel]:
    return bundle_from_records(record, {e.model: models[e.model] for e in record.models if e.model in models}, load_catalog(None))


async def fetch_bundle(js: JetStreamContext, name: str, stopping: asyncio.Event, *, timeout: float = 60.0) -> tuple[registry.DeploymentRecord, list[BundleModel]]:
    """The deployment's record and the emulator's view of its bundle, once the registry
    has them (a node may start before the registry has applied its fleet)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        record, models = await _read(js, name)
        if record is not None:
            return record, _bundle(record, models)
        if stopping.is_set() or loop.time() > deadline:
            raise LookupError(f"deployment {name!r} is not in the registry (apply a fleet file that declares it)")
        log.info("waiting for deployment %r in the registry", name)
        await first(stopping.wait(), timeout=0.5)


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
    record, models = await _read(js, name)
    if record is None:
        return f"deployment {name!r} was deleted from the registry"
    try:
        bundle = _bundle(record, models)
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
